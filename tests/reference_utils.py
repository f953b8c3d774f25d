"""Shared test helpers for comparisons with the reference (SSSegmentation 1.7.0, `ssseg`).

- `import_ssseg_builder()`: imports the reference's segmentor builder. `import ssseg.modules`
  imports torchvision, whose PyPI wheel fails to import beside the CPU torch; MCIBI never calls
  torchvision (only the SAM-family models do), so a stand-in module whose functions raise is
  registered under that name first.
- `reference_cfg(...)`: the reference's model config dict (the PyPI package ships no configs;
  the values are those of `mcibi_deeplabv3_resnet50os8_ade20k` from the spec).
- `project_config(...)`: the matching memseg_jax config (configs/default.py with overrides).
- `build_reference(cfg, mode)`: the reference model on CPU, float32, random weights, BN
  statistics calibrated on the test's images and perturbed (`calibrate_batchnorm`), so that
  activations keep a useful scale through 50+ layers and every BN entry differs from its
  default.
- `to_numpy_state_dict`, `nchw_to_nhwc`, `nhwc_to_nchw`: layout helpers at the boundary.
- `vit_backbone_cfg`, `vit_mcibi_cfgs`, `randomize_vit`: the MCIBI ViT-L model (or a reduced
  ViT of the same layout) on both sides, with the constant-initialised ViT parameters drawn at
  random.
"""

import copy
import importlib.util
import os
import sys
import types

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _install_torchvision_stand_in():
  if 'torchvision' in sys.modules:
    return

  def unavailable(*args, **kwargs):
    raise RuntimeError('torchvision stand-in: the MCIBI reference does not use torchvision')

  attrs = {
      'torchvision': [],
      'torchvision.transforms': ['Normalize', 'Resize', 'ToTensor'],
      'torchvision.transforms.functional': ['resize', 'to_pil_image'],
      'torchvision.ops': [],
      'torchvision.ops.boxes': ['batched_nms', 'box_area'],
  }
  for name, names in attrs.items():
    module = types.ModuleType(name)
    for attr in names:
      setattr(module, attr, unavailable)
    sys.modules[name] = module
    if '.' in name:
      parent, child = name.rsplit('.', 1)
      setattr(sys.modules[parent], child, module)


def import_ssseg_builder():
  """(BuildSegmentor, SSSegInputStructure) from the installed reference."""
  _install_torchvision_stand_in()
  from ssseg.modules.models.segmentors.builder import BuildSegmentor
  from ssseg.modules.utils.datastructure import SSSegInputStructure
  return BuildSegmentor, SSSegInputStructure


# ImageNet ResNet-v1c structure names of the reference (the weights are never loaded here).
_STRUCTURE_TYPES = {18: 'resnet18conv3x3stem', 50: 'resnet50conv3x3stem',
                    101: 'resnet101conv3x3stem'}


def reference_cfg(*, model='mcibi', num_classes=150, depth=50, head_type='aspp', dropout=0.1,
                  aux_dropout=0.1, act='relu', strategy='cosine_similarity', base_lr=0.01,
                  num_feats_per_cls=1, use_loss=True, backbone=None, head=None,
                  auxiliary='default'):
  """The reference's segmentor cfg dict (ignore label -100, as in ssseg 1.7.0).

  `backbone` (a dict) replaces the ResNet backbone cfg, `head` (a dict) updates the head cfg
  (e.g. `in_channels` of another backbone), `auxiliary` replaces the FCN auxiliary cfg (None:
  no auxiliary head, and no `loss_aux`).
  """
  c5, c4 = (512, 256) if depth == 18 else (2048, 1024)
  act_cfg = ({'type': 'ReLU', 'inplace': True} if act == 'relu'
             else {'type': 'LeakyReLU', 'negative_slope': 0.01, 'inplace': True})
  ce = lambda scale: {'type': 'CrossEntropyLoss', 'scale_factor': scale, 'ignore_index': -100,
                      'reduction': 'mean'}
  cfg = {
      'num_classes': num_classes,
      'align_corners': False,
      'norm_cfg': {'type': 'SyncBatchNorm'},
      'act_cfg': act_cfg,
      'backbone': {
          'type': 'ResNet', 'depth': depth, 'structure_type': _STRUCTURE_TYPES[depth],
          'pretrained': False, 'outstride': 8, 'use_conv3x3_stem': True,
          'selected_indices': (0, 1, 2, 3) if model == 'mcibi' else (2, 3),
      },
      'auxiliary': {'in_channels': c4, 'out_channels': 512, 'dropout': aux_dropout},
  }
  if model == 'mcibi':
    cwi = ({'dilations': [1, 12, 24, 36]} if head_type == 'aspp'
           else {'pool_scales': [1, 2, 3, 6]})
    cfg.update({
        'type': 'MCIBI',
        'head': {
            'downsample_backbone': {'kernel_size': 3, 'stride': 1, 'padding': 1, 'bias': False},
            'context_within_image': {'is_on': True, 'type': head_type, 'cfg': cwi},
            'use_hard_aggregate': False, 'in_channels': c5, 'feats_channels': 512,
            'transform_channels': 256, 'out_channels': 512, 'num_feats_per_cls': num_feats_per_cls,
            'use_loss': use_loss,
            'loss_cfg': {'type': 'CrossEntropyLoss', 'scale_factor': 1.0, 'reduction': 'mean'},
            'update_cfg': {
                'strategy': strategy, 'ignore_index': -100,
                'momentum_cfg': {'base_momentum': 0.9, 'base_lr': base_lr,
                                 'adjust_by_learning_rate': True},
            },
            'dropout': dropout,
        },
        'losses': {'loss_aux': ce(0.4), 'loss_cls_stage1': ce(0.4), 'loss_cls_stage2': ce(1.0)},
    })
  else:
    cfg.update({
        'type': 'Deeplabv3',
        'head': {'in_channels': c5, 'feats_channels': 512, 'dilations': [1, 12, 24, 36],
                 'dropout': dropout},
        'losses': {'loss_aux': ce(0.4), 'loss_cls': ce(1.0)},
    })
  if backbone is not None:
    cfg['backbone'] = copy.deepcopy(backbone)
  if head is not None:
    cfg['head'].update(copy.deepcopy(head))
  if auxiliary is None:
    cfg['auxiliary'] = None
    cfg['losses'].pop('loss_aux')
  elif auxiliary != 'default':
    cfg['auxiliary'] = copy.deepcopy(auxiliary)
  return cfg


def project_config(*, model='mcibi', num_classes=150, depth=50, head_type='aspp', dropout=0.1,
                   aux_dropout=0.1, act='relu', strategy='cosine_similarity', base_lr=0.01,
                   num_feats_per_cls=1, use_loss=True, overrides=None):
  """configs/default.py with the same choices as `reference_cfg`.

  `overrides` {'model.backbone.type': 'hrnet', ...}: dotted config keys set last (keys that
  default.py lacks are added, e.g. a backbone's own fields).
  """
  spec = importlib.util.spec_from_file_location(
      'memseg_default_config', os.path.join(REPO_ROOT, 'configs', 'default.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  m = config.model
  m.name = model
  m.num_classes = num_classes
  m.act = act
  m.backbone.depth = depth
  m.head.type = head_type
  m.head.dropout = dropout
  m.auxiliary.dropout = aux_dropout
  m.memory.update_strategy = strategy
  m.memory.base_lr = base_lr
  m.memory.num_feats_per_cls = num_feats_per_cls
  m.memory.use_loss = use_loss
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


# Scale of the last BN of each residual block in `calibrate_batchnorm` (see there).
RESIDUAL_GAIN = 0.1


def calibrate_batchnorm(module, run_forward, *, seed=0):
  """Gives every BN layer of a random torch `module` statistics that suit its actual inputs.

  Default-initialised BN layers in eval mode would shrink or blow up the activations of a
  random 50-layer network, which makes a parity test insensitive. So `run_forward()` (one
  eval forward of the test's own inputs, under no_grad) runs with a pre-hook on every BN that
  sets the layer's statistics from its input just before it normalises: mean = batch mean,
  var = batch variance + mean^2 / 2 (the extra term keeps near-constant channels, e.g. the 1x1
  global-pool branch of ASPP, from being amplified), each perturbed at random; the affine
  parameters are drawn around (1, 0). So no BN entry keeps its default, and eval-mode BN
  differs from batch normalisation.

  The last BN of every residual block gets its scale times RESIDUAL_GAIN: a randomly
  initialised BN network is chaotic (float32 rounding grows with depth; the reference itself
  then differs from its float64 run by ~7e-4 of the logits), and damping the residual
  branches brings that to ~1e-5 while every weight still counts.
  """
  import torch
  gen = torch.Generator().manual_seed(seed)
  for block in module.modules():
    if type(block).__name__ in ('Bottleneck', 'BasicBlock'):
      last_bn = block.bn3 if hasattr(block, 'bn3') else block.bn2
      last_bn.calibration_gain = RESIDUAL_GAIN

  def calibrate(bn, inputs):
    x = inputs[0]
    c = bn.num_features
    mean = x.mean(dim=(0, 2, 3))
    var = (x.var(dim=(0, 2, 3), unbiased=False) + 0.5 * mean ** 2).clamp(min=1e-3)
    gain = getattr(bn, 'calibration_gain', 1.0)
    bn.running_mean.copy_(mean + 0.1 * torch.randn(c, generator=gen) * var.sqrt())
    bn.running_var.copy_(var * torch.empty(c).uniform_(0.8, 1.25, generator=gen))
    bn.weight.copy_(gain * torch.empty(c).uniform_(0.8, 1.25, generator=gen))
    bn.bias.copy_(0.1 * torch.randn(c, generator=gen))

  bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
  was_training = module.training
  module.eval()
  hooks = [bn.register_forward_pre_hook(calibrate) for bn in bns]
  try:
    with torch.no_grad():
      run_forward()
  finally:
    for hook in hooks:
      hook.remove()
  module.train(was_training)
  return module


def build_reference(cfg, mode='TEST', *, seed=0, calibration_images=None, random_memory=False,
                    prepare=None):
  """The reference segmentor (CPU, float32) with random weights and calibrated BN.

  BN is calibrated (`calibrate_batchnorm`) on `calibration_images` (NCHW; pass the test's own
  images: a random network generalises poorly from other noise images; default two random
  64x64 images). With `random_memory` the memory is set to U[0, 1) first (a non-zero memory
  for eval tests). `prepare(model, generator)`, if given, runs before the calibration (e.g. to
  randomise parameters the reference initialises to constants). Returned in `mode`: 'TEST' ->
  eval(), 'TRAIN' / 'TRAIN_DEVELOP' -> train() with that mode.
  """
  import torch
  BuildSegmentor, SSSegInputStructure = import_ssseg_builder()
  torch.manual_seed(seed)
  model = BuildSegmentor(copy.deepcopy(cfg), mode='TEST')
  model.eval()
  gen = torch.Generator().manual_seed(seed + 1)
  if calibration_images is None:
    calibration_images = torch.randn(2, 3, 64, 64, generator=gen)
  images = torch.as_tensor(np.asarray(calibration_images, np.float32))
  if prepare is not None:
    with torch.no_grad():
      prepare(model, gen)
  if random_memory and hasattr(model, 'memory_module'):
    with torch.no_grad():
      memory = model.memory_module.memory
      memory.copy_(torch.rand(memory.shape, generator=gen))
  calibrate_batchnorm(model, lambda: model(SSSegInputStructure(images=images, mode='TEST')),
                      seed=seed + 2)
  return set_mode(model, mode)


def set_mode(model, mode):
  """`model` in `mode`: 'TEST' -> eval(), 'TRAIN' / 'TRAIN_DEVELOP' -> train() with that mode."""
  if mode == 'TEST':
    model.eval()
  else:
    model.train()
    model.mode = mode
  return model


def to_numpy_state_dict(model):
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def nchw_to_nhwc(x):
  return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x):
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


# ---------------------------------------------------------------------------------------- ViT
# The reference's `jx_vit_large_p16_384` sizes (spec wave2 section 3).
VIT_LARGE = dict(img_size=(512, 512), patch_size=16, embed_dims=1024, num_layers=24,
                 num_heads=16, mlp_ratio=4, out_indices=(9, 14, 19, 23))


def vit_backbone_cfg(*, drop_rate=0.0, **sizes):
  """The reference's ViT backbone cfg of the MCIBI ViT-L configs, with `sizes` overridden.

  1.7.0 asserts drop_rate 0.1 for structure_type 'jx_vit_large_p16_384' (AUTO_ASSERT); the
  structure name here is not in that table, so the assertion does not run and drop_rate 0.0
  (the released models' value) can be built. The name is used for nothing else when
  `pretrained` is False.
  """
  arch = dict(VIT_LARGE, **sizes)
  return {
      'type': 'VisionTransformer', 'structure_type': 'jx_vit_large_p16_384_parity',
      'img_size': tuple(arch['img_size']), 'out_indices': tuple(arch['out_indices']),
      'norm_cfg': {'type': 'LayerNorm', 'eps': 1e-6}, 'pretrained': False,
      'selected_indices': (0, 1, 2, 3), 'patch_size': arch['patch_size'],
      'embed_dims': arch['embed_dims'], 'num_layers': arch['num_layers'],
      'num_heads': arch['num_heads'], 'mlp_ratio': arch['mlp_ratio'], 'qkv_bias': True,
      'drop_rate': drop_rate, 'attn_drop_rate': 0., 'drop_path_rate': 0.,
      'with_cls_token': True, 'output_cls_token': False, 'patch_norm': False,
      'final_norm': False, 'num_fcs': 2,
  }


def vit_mcibi_cfgs(*, config_file='ade20k_vitl.py', dropout=0.0, drop_rate=0.0, num_classes=None,
                   **sizes):
  """(reference cfg, memseg_jax config) of MCIBI ViT-L from `configs/<config_file>`.

  `sizes` (embed_dims, num_layers, num_heads, out_indices, img_size, ...) shrink the ViT on
  both sides; `dropout` is every head dropout (decoders and auxiliary heads), `drop_rate` the
  ViT's. Head values (K, ASPP dilations, memory lr, memory loss) come from the config file.
  """
  spec = importlib.util.spec_from_file_location(
      'memseg_vit_config', os.path.join(REPO_ROOT, 'configs', config_file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  m = config.model
  if num_classes is not None:
    m.num_classes = num_classes
  for key, value in sizes.items():
    m.backbone[key] = tuple(value) if isinstance(value, (list, tuple)) else value
  m.backbone.drop_rate = drop_rate
  m.head.dropout = dropout
  m.auxiliary.dropout = dropout
  dims = m.backbone.embed_dims
  ce = lambda scale: {'type': 'CrossEntropyLoss', 'scale_factor': scale, 'ignore_index': -100,
                      'reduction': 'mean'}
  aux = {'in_channels': dims, 'out_channels': m.auxiliary.channels, 'dropout': dropout,
         'num_convs': m.auxiliary.num_convs, 'upsample': {'scale_factor': m.auxiliary.upsample}}
  cfg = reference_cfg(
      num_classes=m.num_classes, dropout=dropout, aux_dropout=dropout,
      base_lr=m.memory.base_lr, use_loss=m.memory.use_loss,
      backbone=vit_backbone_cfg(drop_rate=drop_rate,
                                **{k: m.backbone[k] for k in VIT_LARGE}),
      head={'in_channels': dims,
            'norm_cfg': {'in_channels_list': [dims] * 4, 'type': 'LayerNorm', 'eps': 1e-6},
            'context_within_image': {'is_on': True, 'type': 'aspp',
                                     'cfg': {'dilations': list(m.head.dilations)}}},
      auxiliary=[dict(aux) for _ in range(m.auxiliary.num_heads)])
  cfg['losses'].pop('loss_aux')
  for i in range(m.auxiliary.num_heads):
    cfg['losses'][f'loss_aux{i + 1}'] = ce(0.4)
  return cfg, config


def randomize_vit(model, gen, *, pos_scale=0.5):
  """Draws the ViT parameters the reference initialises to constants (cls token and position
  embedding zeros, LayerNorm 1/0, attention biases 0) at random, in `model.backbone_net` and
  the segmentor's `norm_layers`, so that each of them influences the outputs of a test."""
  import torch
  modules = [model.backbone_net] + ([model.norm_layers] if hasattr(model, 'norm_layers') else [])
  for module in modules:
    for name, p in module.named_parameters():
      if name.endswith(('cls_token', 'pos_embed')):
        p.copy_(pos_scale * torch.randn(p.shape, generator=gen))
      elif (name.endswith('weight') and p.ndim == 1):       # LayerNorm scales
        p.copy_(torch.empty(p.shape).uniform_(0.8, 1.25, generator=gen))
      elif name.endswith('bias'):
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
  return model
