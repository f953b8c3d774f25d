"""The reference's MCIBI++ and UPerNet model cfgs (SSSegmentation 1.7.0) for parity tests.

Written out from `ssseg/configs/_base_/segmentors/{mcibiplusplus,upernet}.py` and the R-50 ADE20K
configs `mcibiplusplus_{resnet50os8,ppm_resnet50os8,aspp_resnet50os8,upernet_resnet50os8}_ade20k`
(git commit 2c26cf72, the sdist's source; the sdist ships no configs), independently of this
project's configs/mcibipp/_base.py. The ignore label is -100 as in the reference.
"""

import copy

from tests import reference_utils as ru

VARIANTS = ('fcn', 'pspnet', 'deeplabv3', 'upernet')


def _ce(scale):
  return {'type': 'CrossEntropyLoss', 'scale_factor': scale, 'ignore_index': -100,
          'reduction': 'mean'}


def reference_cfg(variant, *, num_classes=150, depth=50, dropout=0.1, aux_dropout=0.1,
                  head=None):
  """The reference cfg of MCIBI++ `variant` (ADE20K settings); `head` updates the head dict."""
  base = ru.reference_cfg(model='deeplabv3', num_classes=num_classes, depth=depth,
                          aux_dropout=aux_dropout)
  c5 = 512 if depth == 18 else 2048
  channels = [64, 128, 256, 512] if depth == 18 else [256, 512, 1024, 2048]
  decoder = lambda cin, **kw: {'in_channels': cin, 'out_channels': 512, 'dropout': dropout, **kw}
  cfg = {
      'type': 'MCIBIPlusPlus',
      'num_classes': num_classes, 'align_corners': False,
      'norm_cfg': base['norm_cfg'], 'act_cfg': base['act_cfg'],
      'backbone': dict(base['backbone'], selected_indices=(0, 1, 2, 3)),
      'auxiliary': base['auxiliary'],
      'head': {
          'context_within_image': {'is_on': False, 'type': 'aspp',
                                   'cfg': {'pool_scales': [1, 2, 3, 6],
                                           'dilations': [1, 12, 24, 36]}},
          'warmup_epoch': 0, 'use_hard_aggregate': False, 'downsample_before_sa': False,
          'force_use_preds_pr': False, 'fuse_memory_cwi_before_fpn': True, 'in_channels': c5,
          'feats_channels': 512, 'transform_channels': 256, 'out_channels': 512,
          'update_cfg': {'ignore_index': -100,
                         'momentum_cfg': {'base_momentum': 0.1, 'base_lr': None,
                                          'adjust_by_learning_rate': False}},
          'decoder': {'pr': decoder(512), 'cwi': decoder(512), 'cls': decoder(512)},
      },
      'losses': {'loss_aux': _ce(0.4), 'loss_pr': _ce(0.4), 'loss_cwi': _ce(1.0),
                 'loss_cls': _ce(1.0)},
  }
  h = cfg['head']
  cwi = h['context_within_image']
  if variant == 'fcn':
    cfg['losses'].pop('loss_cwi')
  elif variant == 'pspnet':
    h['decoder']['cls'] = decoder(1024)
    h['force_use_preds_pr'] = True
    cwi.update(type='ppm', is_on=True)
  elif variant == 'deeplabv3':
    h['decoder']['cls'] = decoder(1024, kernel_size=3, padding=1)
    cwi.update(is_on=True, use_self_attention=False)
  elif variant == 'upernet':
    h['fpn'] = {'in_channels_list': channels, 'feats_channels': 1024, 'out_channels': 512}
    h['decoder']['cls'] = decoder(2560, kernel_size=3, padding=1)
    cwi.update(type='ppm', is_on=True, use_self_attention=False)
  else:
    raise ValueError(variant)
  if head:
    h.update(copy.deepcopy(head))
  return cfg


def upernet_reference_cfg(*, num_classes=150, depth=50, dropout=0.1, aux_dropout=0.1):
  """The reference's `upernet_resnet50os8_ade20k` model cfg (UPerNet R-50-D8)."""
  base = ru.reference_cfg(model='deeplabv3', num_classes=num_classes, depth=depth,
                          aux_dropout=aux_dropout)
  channels = [64, 128, 256, 512] if depth == 18 else [256, 512, 1024, 2048]
  return {
      'type': 'UPerNet', 'num_classes': num_classes, 'align_corners': False,
      'norm_cfg': base['norm_cfg'], 'act_cfg': base['act_cfg'],
      'backbone': dict(base['backbone'], selected_indices=(0, 1, 2, 3)),
      'auxiliary': base['auxiliary'],
      'head': {'in_channels_list': channels, 'feats_channels': 512, 'pool_scales': [1, 2, 3, 6],
               'dropout': dropout},
      'losses': {'loss_aux': _ce(0.4), 'loss_cls': _ce(1.0)},
  }
