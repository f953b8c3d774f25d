"""Shared by the MCIBI++ configs of this folder (not a config itself): one released model each.

`get_config(decoder, dataset)` starts from the project's dataset config (configs/<dataset>.py,
the MCIBI recipe's data pipeline and evaluation protocol) and sets the reference's MCIBI++
values (SSSegmentation 1.7.0, `ssseg/configs/mcibiplusplus/mcibiplusplus_*_resnet50os8_*.py`
and `_base_/segmentors/mcibiplusplus.py`):

- common: R-50-D8, head 2048 -> 512, memory transform 256 / out 512, memory momentum 0.1 fixed,
  the fused memory update, decoders with Dropout2d 0.1, FCN auxiliary head on C4; losses
  cls 1.0, pr 0.4, cwi 1.0 (not in the FCN variant), aux 0.4; SGD momentum 0.9, poly 0.9,
  lr_min 1% of lr; whole single-scale inference on logits (`use_probs_before_resize` off).
- datasets: ADE20K BS 16, 130 epochs; Cityscapes train/val BS 8, 220 epochs, whole 1024x2048
  inference; LIP BS 32, 150 epochs, ReLU (the MCIBI LIP configs' LeakyReLU is not used);
  COCO-Stuff-10k BS 16, 110 epochs, lr 0.001, weight decay 1e-4 (PSPNet: lr_min 1e-4).
- decoders (context module, segmentor self-attention, gathering logits, decoder kernels,
  FPN): `VARIANTS` below, per dataset as the reference's configs set them.
"""

from memseg_jax.config_validation import load_sibling_config

DATASETS = ('ade20k', 'cityscapes', 'lip', 'cocostuff10k')
DECODERS = ('fcn', 'pspnet', 'deeplabv3', 'upernet')

# The reference's checkpoint names (github.com/SegmentationBLWX/modelstore, ssseg_mcibiplusplus).
CHECKPOINT_PREFIX = {'fcn': 'mcibiplusplus_resnet50os8', 'pspnet': 'mcibiplusplus_ppm_resnet50os8',
                     'deeplabv3': 'mcibiplusplus_aspp_resnet50os8',
                     'upernet': 'mcibiplusplus_upernet_resnet50os8'}

_ADE_LIKE = {
    'fcn': dict(context=None),
    'pspnet': dict(context='ppm', self_attention=True, force_pr=True, kernels=(1, 1, 1)),
    'deeplabv3': dict(context='aspp', self_attention=False, kernels=(1, 1, 3)),
    'upernet': dict(context='ppm', self_attention=False, kernels=(1, 1, 3), fpn_out=512),
}
# (decoder, dataset) -> head settings; kernels = conv1 of (decoder_pr, decoder_cwi, decoder_cls).
VARIANTS = {
    **{(d, 'ade20k'): v for d, v in _ADE_LIKE.items()},
    ('fcn', 'cityscapes'): dict(context=None),
    ('pspnet', 'cityscapes'): dict(context='ppm', self_attention=False, kernels=(3, 3, 3)),
    ('deeplabv3', 'cityscapes'): dict(context='aspp', self_attention=True, kernels=(1, 1, 1)),
    ('upernet', 'cityscapes'): dict(context='ppm', self_attention=False, kernels=(1, 1, 1),
                                    fpn_out=1024),
    ('fcn', 'lip'): dict(context=None),
    ('pspnet', 'lip'): dict(context='ppm', self_attention=True, kernels=(1, 1, 1)),
    ('deeplabv3', 'lip'): dict(context='aspp', self_attention=True, kernels=(1, 1, 1)),
    ('upernet', 'lip'): _ADE_LIKE['upernet'],
    ('fcn', 'cocostuff10k'): dict(context=None),
    ('pspnet', 'cocostuff10k'): dict(context='ppm', self_attention=True, kernels=(1, 1, 3)),
    ('deeplabv3', 'cocostuff10k'): dict(context='aspp', self_attention=True, kernels=(1, 1, 3)),
    ('upernet', 'cocostuff10k'): _ADE_LIKE['upernet'],
}


def set_mcibipp_head(config, decoder: str, dataset: str = 'ade20k'):
  """Sets model.name = 'mcibipp' and the head of `decoder` as the reference's `dataset` config."""
  v = VARIANTS[(decoder, dataset)]
  m = config.model
  m.name = 'mcibipp'
  m.memory.transform_channels = 256
  m.memory.out_channels = 512
  m.memory.use_hard_aggregate = False
  m.memory.base_momentum = 0.1
  m.memory.adjust_by_learning_rate = False
  m.memory.use_loss = False
  m.memory.fused_update = True     # equal to the upsampled form (tests/models/test_mcibipp*)
  m.memory.use_context_within_image = v['context'] is not None
  if v['context'] is not None:
    m.head.type = v['context']
  pp = m.mcibipp
  pp.use_self_attention = v.get('self_attention', True)
  pp.force_use_preds_pr = v.get('force_pr', False)
  pp.downsample_before_sa = False
  pp.decoder_pr_kernel, pp.decoder_cwi_kernel, pp.decoder_cls_kernel = v.get('kernels', (1, 1, 1))
  pp.fpn = 'fpn_out' in v
  pp.fpn_feats_channels = m.memory.out_channels + m.head.feats_channels
  pp.fpn_out_channels = v.get('fpn_out', 512)
  config.loss.stage2 = 1.0         # loss_cls
  config.loss.stage1 = 0.4         # loss_pr
  config.loss.cwi = 1.0
  config.loss.aux = 0.4
  return config


def get_config(decoder: str = 'fcn', dataset: str = 'ade20k'):
  if decoder not in DECODERS or dataset not in DATASETS:
    raise ValueError(f'mcibipp config: decoder {decoder!r} must be one of {DECODERS}, '
                     f'dataset {dataset!r} one of {DATASETS}')
  config = load_sibling_config(__file__, f'../{dataset}').get_config()
  config.model.backbone.depth = 50
  set_mcibipp_head(config, decoder, dataset)
  t = config.train
  t.lr_min = -1.0                  # 1% of lr
  if dataset == 'ade20k':
    t.batch_size, t.num_epochs, t.lr, t.weight_decay = 16, 130, 0.01, 5e-4
  elif dataset == 'cityscapes':
    d = config.data
    d.train_split, d.eval_split, d.num_train_images = 'train', 'validation', 2975
    t.batch_size, t.num_epochs, t.lr, t.weight_decay = 8, 220, 0.01, 5e-4
  elif dataset == 'lip':
    config.model.act = 'relu'
    t.batch_size, t.num_epochs, t.lr, t.weight_decay = 32, 150, 0.01, 5e-4
  else:
    t.batch_size, t.num_epochs, t.lr, t.weight_decay = 16, 110, 0.001, 1e-4
    if decoder == 'pspnet':
      t.lr_min = 1e-4
  i = config.inference
  i.mode = 'whole'
  i.scales = (1.0,)
  i.flip = False
  i.use_probs_before_resize = False
  return config
