"""Test helpers for HRNet comparisons with the reference (SSSegmentation 1.7.0).

- `patched_reference()`: a context in which the reference HRNet can be built and the test arch
  `TINY_ARCH` exists on both sides. SSSegmentation 1.7.0's `HRModule.__init__` reads
  `self.use_checkpoint` (in `makebranch`) before it assigns it, so `HRNet(...)` raises
  AttributeError as released (fixed upstream after 1.7.0, commit e1cefb5e). The workaround is a
  class attribute `HRModule.use_checkpoint = False` (the value the constructor assigns right
  after), which changes no numerics. The reference's `arch` is a key of the class table
  `HRNet.arch_settings`, so the narrow test arch is registered there and in ours alike.
- `TINY_ARCH`: a narrow HRNet with every structural feature of W48 (bottleneck stage 1 with a
  projection, 2/3/4 branches, two modules in stage 3 so modules chain, a 2-block branch, fuse
  layers in both directions incl. the 3-step downsampling chain); 8/16/32/64 channels.
- `reference_hrnet_cfg`, `project_overrides`: the two sides' configs for one HRNet MCIBI.
"""

import contextlib

from memseg_jax.models.backbones import hrnet
from tests import reference_utils as ru

TINY_ARCH = {
    'stage1': {'num_modules': 1, 'num_branches': 1, 'block': 'BOTTLENECK', 'num_blocks': (1,),
               'num_channels': (64,)},
    'stage2': {'num_modules': 1, 'num_branches': 2, 'block': 'BASIC', 'num_blocks': (1, 1),
               'num_channels': (8, 16)},
    'stage3': {'num_modules': 2, 'num_branches': 3, 'block': 'BASIC', 'num_blocks': (1, 1, 1),
               'num_channels': (8, 16, 32)},
    'stage4': {'num_modules': 1, 'num_branches': 4, 'block': 'BASIC', 'num_blocks': (1, 2, 1, 1),
               'num_channels': (8, 16, 32, 64)},
}
TINY = 'test_tiny'


@contextlib.contextmanager
def patched_reference():
  """The reference's HRNet made buildable, and `TINY` registered on both sides."""
  import pytest  # pylint: disable=import-outside-toplevel
  ru.import_ssseg_builder()
  from ssseg.modules.models.backbones import hrnet as ref_hrnet  # pylint: disable=import-outside-toplevel
  with pytest.MonkeyPatch.context() as mp:
    # Workaround for the 1.7.0 bug described in the module docstring.
    mp.setattr(ref_hrnet.HRModule, 'use_checkpoint', False, raising=False)
    mp.setitem(ref_hrnet.HRNet.arch_settings, TINY, TINY_ARCH)
    mp.setitem(hrnet.ARCH_SETTINGS, TINY, TINY_ARCH)
    yield ref_hrnet


def reference_backbone(arch):
  return {'type': 'HRNet', 'structure_type': 'hrnetv2_w48', 'arch': arch, 'pretrained': False,
          'selected_indices': (0, 0, 0, 0)}


def reference_hrnet_cfg(arch, *, downsample_stride=1, **kwargs):
  """The reference MCIBI cfg of an HRNet config: 1/4 head input, no auxiliary head."""
  head = {'in_channels': hrnet.output_channels(arch),
          'downsample_backbone': {'kernel_size': 3, 'stride': downsample_stride, 'padding': 1,
                                  'bias': False}}
  return ru.reference_cfg(backbone=reference_backbone(arch), head=head, auxiliary=None, **kwargs)


def project_hrnet_config(arch, *, downsample_stride=1, stem_relu=True, **kwargs):
  """The matching memseg_jax config (stem_relu True: SSSegmentation 1.7.0's stem)."""
  overrides = {
      'model.backbone.type': 'hrnet', 'model.backbone.arch': arch,
      'model.backbone.stem_relu': stem_relu, 'model.backbone.selected_indices': (0, 0, 0, 0),
      'model.auxiliary.enabled': False,
      'model.head.downsample_backbone_stride': downsample_stride,
  }
  config = ru.project_config(overrides=overrides, **kwargs)
  for key in ('depth', 'output_stride', 'contract_dilation'):   # ResNet keys of default.py
    del config.model.backbone[key]
  return config
