"""HRNetV2 backbone (reference `ssseg/modules/models/backbones/hrnet.py`): HRNetV2p-W48 and kin.

Four stages keep parallel branches at 1/4, 1/8, 1/16 and 1/32 of the input:

    stem     conv1 3x3 s2 -> bn1 [-> ReLU, `stem_relu`] -> conv2 3x3 s2 -> bn2 -> ReLU   (64 @ 1/4)
    layer1   Bottleneck x num_blocks, 64 -> 256
    stage2..4: a transition (new branch: 3x3 s2 CBR on the last branch; changed width: 3x3 s1
             CBR), then `num_modules` HRModules: every branch runs its BasicBlocks, then each
             output i sums all branches j (in order j = 0..n-1) brought to branch i, then ReLU:
             j > i: 1x1 conv + BN, upsampled x2^(j-i) (nn.Upsample), then resized to branch i's
                    exact size (F.interpolate: a slight downsample when branch sizes are not
                    exact halves, e.g. 120 -> 119 for LIP's 473 crops);
             j < i: i-j stride-2 3x3 convs (CBR, the last one without ReLU).
    output   every branch resized (bilinear) to branch 0's size and concatenated: one map, e.g.
             48 + 96 + 192 + 384 = 720 channels at 1/4 for W48.

All resizes are PyTorch's bilinear with align_corners=False and no antialiasing
(`ops.resize_bilinear`). The backbone returns that one map; MCIBI reads it four times
(`selected_indices` (0, 0, 0, 0), the reference's `transforminputs` default for HRNet).

`stem_relu`: SSSegmentation 1.7.0 applies a ReLU after the stem's first BN; the code that
trained the released MCIBI HRNet checkpoints (every ssseg version before June 2025, and HEAD's
`mcibi_version=True`) does not. The default (False) is the latter, so converted checkpoints
give the reported numbers; True reproduces the 1.7.0 package (the parity tests use it).

Submodule names mirror the reference state_dict, so `memseg_jax.convert`'s generic rule maps
every key: `conv1`, `bn1`, `conv2`, `bn2`, `layer1_0/conv1` ..., `transition1_0` (a ConvBNAct:
conv/bn <-> `transition1.0.0`/`.1`), `transition1_1_0` (`transition1.1.0.{0,1}`),
`stage2_0/branches_0_0/conv1` (`stage2.0.branches.0.0.conv1`), `stage2_0/fuse_layers_0_1`
(`fuse_layers.0.1.{0,1}`), `stage3_0/fuse_layers_2_0_1` (`fuse_layers.2.0.1.{0,1}`).

No padded (`valid`) evaluation: the two-step resampling depends on each image's true branch
sizes, so evaluation runs every image at its exact size (SUPPORTS_VALID_HW False).
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from memseg_jax import ops
from memseg_jax.models.backbones.resnet import BasicBlock, Bottleneck, EXPANSION
from memseg_jax.models.layers import BatchNorm, ConvBNAct, conv

SUPPORTS_VALID_HW = False


def _stage(num_modules, block, num_blocks, num_channels):
  return {'num_modules': num_modules, 'num_branches': len(num_blocks), 'block': block,
          'num_blocks': num_blocks, 'num_channels': num_channels}


def _arch(width, blocks, modules):
  """The reference's HRNetV2 settings: branch widths w, 2w, 4w, 8w; stage1 64 (x4)."""
  return {
      'stage1': _stage(1, 'BOTTLENECK', (blocks,), (64,)),
      'stage2': _stage(modules[0], 'BASIC', (blocks,) * 2, (width, 2 * width)),
      'stage3': _stage(modules[1], 'BASIC', (blocks,) * 3, (width, 2 * width, 4 * width)),
      'stage4': _stage(modules[2], 'BASIC', (blocks,) * 4,
                       (width, 2 * width, 4 * width, 8 * width)),
  }


# config.model.backbone.arch -> stage settings, in the reference's `HRNet.arch_settings` form.
ARCH_SETTINGS = {
    'hrnetv2_w18_small': _arch(18, 2, (1, 3, 2)),
    'hrnetv2_w18': _arch(18, 4, (1, 4, 3)),
    'hrnetv2_w32': _arch(32, 4, (1, 4, 3)),
    'hrnetv2_w40': _arch(40, 4, (1, 4, 3)),
    'hrnetv2_w48': _arch(48, 4, (1, 4, 3)),
}
_BLOCKS = {'BASIC': (BasicBlock, EXPANSION['basic']),
           'BOTTLENECK': (Bottleneck, EXPANSION['bottleneck'])}


def check_config(cfg) -> None:
  """Raises ValueError naming the `config.model.backbone` key this backbone cannot build."""
  if cfg.get('arch') not in ARCH_SETTINGS:
    raise ValueError(f"config.model.backbone.arch={cfg.get('arch')!r} is not one of "
                     f"{', '.join(repr(a) for a in ARCH_SETTINGS)}")
  if not isinstance(cfg.get('stem_relu', False), bool):
    raise ValueError(f"config.model.backbone.stem_relu={cfg.get('stem_relu')!r} must be True "
                     'or False')


def output_strides(cfg) -> Tuple[int]:
  """One output: the concatenation of all branches at 1/4."""
  del cfg
  return (4,)


def output_channels(arch: str) -> int:
  """Channels of the concatenated output (720 for hrnetv2_w48)."""
  stage4 = ARCH_SETTINGS[arch]['stage4']
  return sum(c * _BLOCKS[stage4['block']][1] for c in stage4['num_channels'])


def build(cfg, **layer_kwargs) -> 'HRNet':
  """The HRNet of `config.model.backbone` (type 'hrnet': arch, stem_relu)."""
  return HRNet(arch=cfg['arch'], stem_relu=bool(cfg.get('stem_relu', False)), **layer_kwargs)


# Top-level modules of the ImageNet classification HRNet that HRNetV2 does not have (the
# reference loads with strict=False, so their keys are ignored).
_IMAGENET_HEAD_PREFIXES = ('incre_modules.', 'downsamp_modules.', 'final_layer.', 'classifier.')


def imagenet_state_dict(state_dict):
  """open-mmlab `hrnetv2_w*`: the classification head's keys are ignored, the rest is kept."""
  kept = {k: v for k, v in state_dict.items() if not k.startswith(_IMAGENET_HEAD_PREFIXES)}
  return kept, sorted(set(state_dict) - set(kept))


def _upsample_to(x, factor: int, size: Sequence[int]):
  """nn.Upsample(scale_factor=factor, bilinear), then F.interpolate to `size` (x: (B, H, W, C)).

  The second step is the identity when the branch sizes are exact multiples; otherwise it
  resamples factor * n to the target size (PyTorch coordinates from the two sizes).
  """
  x = ops.resize_bilinear(x, scale_factor=float(factor))
  return ops.resize_bilinear(x, tuple(size))


class _Layers(nn.Module):
  """Normalisation/compute fields shared by the HRNet modules, and their layer factories."""
  train: bool = False
  axis_name: Optional[str] = None
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  def _kwargs(self):
    return dict(train=self.train, axis_name=self.axis_name, bn_momentum=self.bn_momentum,
                bn_eps=self.bn_eps, dtype=self.dtype, conv_impl=self.conv_impl)

  def _cbr(self, features, kernel_size, stride=1, act='relu', name=None):
    return ConvBNAct(features, kernel_size, stride=stride, act=act, name=name, **self._kwargs())

  def _blocks(self, x, block: str, planes: int, num_blocks: int, in_channels: int, prefix: str):
    """`num_blocks` residual blocks (the first with a 1x1 projection if the width changes)."""
    block_cls, expansion = _BLOCKS[block]
    for k in range(num_blocks):
      x = block_cls(planes, downsample=k == 0 and in_channels != planes * expansion,
                    name=f'{prefix}_{k}', **self._kwargs())(x)
    return x


class HRModule(_Layers):
  """One multi-resolution module: parallel branches, then the exchange (fuse) between them."""
  block: str = 'BASIC'
  num_blocks: Sequence[int] = (4, 4)
  in_channels: Sequence[int] = (48, 96)
  num_channels: Sequence[int] = (48, 96)

  @nn.compact
  def __call__(self, xs):   # xs: one (B, H_b, W_b, C_b) map per branch
    n = len(xs)
    expansion = _BLOCKS[self.block][1]
    xs = [self._blocks(x, self.block, self.num_channels[b], self.num_blocks[b],
                       self.in_channels[b], f'branches_{b}') for b, x in enumerate(xs)]
    if n == 1:
      return xs
    channels = [c * expansion for c in self.num_channels]
    outputs = []
    for i in range(n):
      y = None
      for j in range(n):
        if j == i:
          t = xs[j]
        elif j > i:
          t = self._cbr(channels[i], 1, act='identity', name=f'fuse_layers_{i}_{j}')(xs[j])
          t = _upsample_to(t, 2 ** (j - i), xs[i].shape[1:3])
        else:
          t = xs[j]
          for k in range(i - j):
            last = k == i - j - 1
            t = self._cbr(channels[i] if last else channels[j], 3, stride=2,
                          act='identity' if last else 'relu', name=f'fuse_layers_{i}_{j}_{k}')(t)
        y = t if y is None else y + t      # the reference's order: j = 0, 1, ..., n - 1
      outputs.append(nn.relu(y))
    return outputs


class HRNet(_Layers):
  """HRNetV2. Returns a 1-tuple: all branches upsampled to 1/4 and concatenated (B, H/4, W/4, C).

  Output sizes follow the stride-2 convs (k 3, p 1): ceil(H / 4) x ceil(W / 4).
  """
  arch: str = 'hrnetv2_w48'
  stem_relu: bool = False

  def _bn(self, name):
    return BatchNorm(use_running_average=not self.train, axis_name=self.axis_name,
                     momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=self.dtype, name=name)

  def _transition(self, xs, pre_channels, cur_channels, index: int):
    """`maketransitionlayer` + its use in the reference forward."""
    out = []
    for i, c in enumerate(cur_channels):
      if i < len(pre_channels):
        if c == pre_channels[i]:
          out.append(xs[i])
        else:
          # The reference feeds every non-None transition from its last branch (`y_list[-1]`;
          # for stage 2 the single stage-1 output). No shipped arch changes an existing
          # branch's width after stage 2, so this only matters for exotic settings.
          out.append(self._cbr(c, 3, name=f'transition{index}_{i}')(xs[-1]))
      else:
        t = xs[-1]
        steps = i + 1 - len(pre_channels)
        for j in range(steps):
          t = self._cbr(c if j == steps - 1 else pre_channels[-1], 3, stride=2,
                        name=f'transition{index}_{i}_{j}')(t)
        out.append(t)
    return out

  @nn.compact
  def __call__(self, x, valid=None):  # x: (B, H, W, 3)
    if valid is not None:
      raise ValueError('HRNet does not take valid sizes (SUPPORTS_VALID_HW is False): evaluate '
                       'each image at its exact size')
    if self.arch not in ARCH_SETTINGS:
      raise ValueError(f'model.backbone.arch: unknown HRNet arch {self.arch!r} (expected one '
                       f'of {sorted(ARCH_SETTINGS)})')
    stages = ARCH_SETTINGS[self.arch]
    kw = dict(dtype=self.dtype, conv_impl=self.conv_impl)
    x = conv(64, 3, stride=2, name='conv1', **kw)(x)
    x = self._bn('bn1')(x)
    if self.stem_relu:      # SSSegmentation 1.7.0 only (module docstring)
      x = nn.relu(x)
    x = conv(64, 3, stride=2, name='conv2', **kw)(x)
    x = nn.relu(self._bn('bn2')(x))

    s1 = stages['stage1']
    x = self._blocks(x, s1['block'], s1['num_channels'][0], s1['num_blocks'][0], 64, 'layer1')
    xs = [x]
    pre_channels = [s1['num_channels'][0] * _BLOCKS[s1['block']][1]]
    for index, name in enumerate(('stage2', 'stage3', 'stage4'), start=1):
      s = stages[name]
      expansion = _BLOCKS[s['block']][1]
      channels = [c * expansion for c in s['num_channels']]
      xs = self._transition(xs, pre_channels, channels, index)
      for m in range(s['num_modules']):
        xs = HRModule(block=s['block'], num_blocks=tuple(s['num_blocks']),
                      in_channels=tuple(channels), num_channels=tuple(s['num_channels']),
                      name=f'{name}_{m}', **self._kwargs())(xs)
      pre_channels = channels
    size = xs[0].shape[1:3]
    return (jnp.concatenate([ops.resize_bilinear(y, size) for y in xs], axis=-1),)
