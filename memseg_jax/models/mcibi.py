"""The MCIBI segmentor (memory on) and the plain DeepLabV3 baseline (memory off).

MCIBI forward (reference `ssseg/modules/models/segmentors/mcibi/mcibi.py`):

    outputs = [backbone(images)[i] for i in selected_indices]   # ResNet: C2..C5
    C5, C4 = outputs[-1], outputs[-2]
    feats_ms      = context_within_image_module(C5)       # ASPP or PPM
    memory_input  = bottleneck(C5)                         # F, the pixel representations
    preds_stage1  = decoder_stage1(F)                      # coarse logits
    memory, out   = memory_module(F, preds_stage1, feats_ms)
    preds_stage2  = decoder_stage2(out)                    # final logits (eval output)
    preds_aux     = auxiliary_decoder(C4)      # ViT-L: three heads, on outputs[-4:-1]

In training, when labels and the learning rate are given, the memory is also updated from F
(detached, upsampled to the label size) and, if asked, `decoder_stage2` classifies the *updated*
memory vectors for the memory loss. These are the reference's values: the memory read uses
the previous iteration's memory, the memory loss the new one, and `decoder_stage2`'s BN running
statistics move twice per step. The reference's in-place update also makes the read's gradient
(w.r.t. the softmax of preds_stage1) use the new memory; the update therefore runs here before
the read, which gets both memories (`_update_memory`). The update is local to the device; the
train step averages the memory across devices.

HRNet (its one 1/4 output selected four times): no auxiliary head, and in the Cityscapes/LIP
configs a stride-2 `downsample_backbone` CBR on the selected outputs (`_downsample_backbone`).

Losses are computed outside (memseg_jax.losses); the model returns low-resolution logits.
"""

from typing import Any, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from memseg_jax import ops
from memseg_jax.models import backbones
from memseg_jax.models import memory as memory_lib
from memseg_jax.models.heads import ASPP, PPM, AuxiliaryDecoder, ClassifierHead, DecoderHead
from memseg_jax.models.layers import ConvBNAct

# config.model.backbone of the R-50-D8 (as `build_model` freezes it: sorted (key, value) pairs).
DEFAULT_BACKBONE = (('contract_dilation', True), ('depth', 50), ('output_stride', 8),
                    ('type', 'resnet'))


def _downsample_backbone_stride(config) -> int:
  return int(config.model.head.get('downsample_backbone_stride', 1))


class _Segmentor(nn.Module):
  """Fields shared by the segmentors (backbone, heads, normalisation, dtype).

  `backbone` is `config.model.backbone` frozen into sorted (key, value) pairs (hashable, so
  equal configs give equal modules and share compiled programs); its 'type' names the module
  in `memseg_jax.models.backbones`. The segmentor reads the backbone outputs listed in
  `selected_indices` (the reference's `transforminputs`): the head the last one, the auxiliary
  head the one before it.
  """
  num_classes: int = 150
  backbone: Tuple[Tuple[str, Any], ...] = DEFAULT_BACKBONE
  selected_indices: Tuple[int, ...] = (0, 1, 2, 3)
  head_type: str = 'aspp'
  feats_channels: int = 512
  dilations: Sequence[int] = (1, 12, 24, 36)
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  dropout: float = 0.1
  aux_enabled: bool = True
  aux_channels: int = 512
  aux_dropout: float = 0.1
  act: str = 'relu'
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  ignore_index: int = 255
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'
  # ViT-L heads (reference `head.norm_cfg`, a list of auxiliary cfgs) and memory savings.
  norm_layers: bool = False      # LayerNorm over channels on each selected backbone output
  norm_eps: float = 1e-6
  aux_num_convs: int = 1         # 3x3 CBRs per auxiliary head
  aux_upsample: int = 0          # nearest upsampling factor after each of them (0: none)
  aux_num_heads: int = 1         # heads on the last n selected outputs before the head's
  remat: bool = False            # rematerialise backbone blocks in the backward pass

  # Whether the segmentor's own layers take `valid_hw` (the backbone says so for itself).
  SUPPORTS_VALID_HW = True

  @classmethod
  def config_fields(cls, config) -> dict:
    """The fields of this segmentor that only it reads from `config.model` (build_model)."""
    del config
    return {}

  @classmethod
  def logits_stride(cls, config) -> int:
    """Stride of the logits: that of the backbone output the head reads (the last selected)."""
    from memseg_jax.models import backbone_config, backbone_module  # pylint: disable=import-outside-toplevel
    strides = backbone_module(config).output_strides(backbone_config(config))
    return int(strides[tuple(config.model.backbone.selected_indices)[-1]])

  def _norm_kwargs(self, train):
    return dict(train=train, axis_name=self.axis_name, bn_momentum=self.bn_momentum,
                bn_eps=self.bn_eps, dtype=self.dtype, conv_impl=self.conv_impl)

  def _backbone(self, images, train, valid_hw) -> Tuple[List[Any], List[Any]]:
    """(selected backbone outputs, their valid sizes (None when unpadded)), in selected order."""
    cfg = dict(self.backbone)
    if self.remat:
      cfg['remat'] = True
    module = backbones.get(cfg['type'])
    outputs = module.build(cfg, name='backbone_net', **self._norm_kwargs(train))(
        images, *(() if valid_hw is None else (self._check_valid(images, valid_hw),)))
    strides = module.output_strides(cfg)
    selected = [outputs[i] for i in self.selected_indices]
    valids = [None if valid_hw is None else -(-valid_hw // strides[i])
              for i in self.selected_indices]
    return self._norm_outputs(selected), valids

  def _norm_outputs(self, outputs):
    """The reference's `norm_layers`: LayerNorm over channels of each output, before all else."""
    if not self.norm_layers:
      return outputs
    return [nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, use_fast_variance=False,
                         name=f'norm_layers_{i}')(x) for i, x in enumerate(outputs)]

  def _check_valid(self, images, valid_hw):
    if images.shape[0] != valid_hw.shape[0]:
      raise ValueError(f'valid_hw {valid_hw.shape} must be (B, 2) for images {images.shape}')
    return jnp.asarray(valid_hw, jnp.int32)

  def _context_module(self, train, name):
    kwargs = dict(features=self.feats_channels, act=self.act, name=name,
                  **self._norm_kwargs(train))
    if self.head_type == 'aspp':
      return ASPP(dilations=tuple(self.dilations), **kwargs)
    if self.head_type == 'ppm':
      return PPM(pool_scales=tuple(self.pool_scales), **kwargs)
    raise ValueError(f"model.head.type: unknown context module {self.head_type!r} "
                     "(expected 'aspp' or 'ppm')")

  def _auxiliary(self, features, outputs, train):
    """The auxiliary head(s) on `features`, the selected outputs before the head's.

    One head (the FCN head on C4): 'preds_aux'. n heads (ViT-L: 3): head i reads
    features[-n + i] and gives 'preds_aux{i+1}' (the reference's `loss_aux{i+1}`).
    """
    # Built at init so the variables exist for eval-only checkpoints too.
    if not (self.aux_enabled and (train or self.is_initializing())):
      return
    n = self.aux_num_heads
    if n > len(features):
      raise ValueError(f'model.auxiliary.num_heads={n} needs {n} backbone outputs before the '
                       f"head's, model.backbone.selected_indices gives {len(features)}")
    for i, x in enumerate(features[len(features) - n:]):
      name = 'auxiliary_decoder' if n == 1 else f'auxiliary_decoder_{i}'
      kwargs = dict(num_classes=self.num_classes, features=self.aux_channels,
                    dropout=self.aux_dropout, act=self.act, name=name, **self._norm_kwargs(train))
      if self.aux_num_convs == 1 and not self.aux_upsample:
        head = DecoderHead(kernel_size=3, **kwargs)
      else:
        head = AuxiliaryDecoder(num_convs=self.aux_num_convs, upsample=self.aux_upsample, **kwargs)
      preds_aux = head(x)
      if train:
        outputs['preds_aux' if n == 1 else f'preds_aux{i + 1}'] = preds_aux.astype(jnp.float32)


class MCIBI(_Segmentor):
  """MCIBI: dataset-level feature memory on top of a DeepLabV3/PSPNet-style head."""
  transform_channels: int = 256
  out_channels: int = 512
  num_feats_per_cls: int = 1
  use_hard_aggregate: bool = False
  use_context_within_image: bool = True
  update_strategy: str = 'cosine_similarity'
  base_momentum: float = 0.9
  base_lr: float = 0.01
  adjust_by_learning_rate: bool = True
  fused_update: bool = True
  # The reference head's `downsample_backbone` stride (HRNet Cityscapes/LIP: 2; 1 = absent).
  downsample_backbone_stride: int = 1

  @classmethod
  def config_fields(cls, config) -> dict:
    mem = config.model.memory
    return dict(
        transform_channels=mem.transform_channels,
        out_channels=mem.out_channels,
        num_feats_per_cls=mem.num_feats_per_cls,
        use_hard_aggregate=mem.use_hard_aggregate,
        use_context_within_image=mem.use_context_within_image,
        update_strategy=mem.update_strategy,
        base_momentum=mem.base_momentum,
        base_lr=mem.base_lr,
        adjust_by_learning_rate=mem.adjust_by_learning_rate,
        fused_update=mem.fused_update,
        downsample_backbone_stride=_downsample_backbone_stride(config))

  @classmethod
  def logits_stride(cls, config) -> int:
    return super().logits_stride(config) * _downsample_backbone_stride(config)

  def _downsample_backbone(self, features, valids, train):
    """The reference's `downsample_backbone`: a 3x3 CBR of the given stride, no bias.

    Applied to every selected output, as the reference does: HRNet's four selections are the
    same map, so the outputs are equal, but in training each call moves the BN running
    statistics once (r <- 0.9^4 r + (1 - 0.9^4) batch per step). The repeated convolutions
    are identical computations on the same operands, which XLA evaluates once.
    """
    s = self.downsample_backbone_stride
    if s == 1:
      return features, valids
    layer = ConvBNAct(features[-1].shape[-1], 3, stride=s, padding=1, act=self.act,
                      name='downsample_backbone', **self._norm_kwargs(train))
    features = [layer(x, v) for x, v in zip(features, valids)]
    return features, [None if v is None else -(-v // s) for v in valids]

  def _update_memory(self, memory_module, memory_input, labels, lr):
    """This step's memory update; returns (memory before, memory after) for the read.

    The reference updates after its forward, but the update reads only F and the labels, so
    running it first changes nothing in the forward, and the read then gets the new memory for
    its gradient, as the reference's in-place update gives it (memory.py,
    `_read_with_grad_memory`).
    """
    if lr is None and self.adjust_by_learning_rate:
      raise ValueError('MCIBI: the memory update needs the learning rate `lr` of this step '
                       '(model.memory.adjust_by_learning_rate is on)')
    momentum = memory_lib.momentum_at(
        lr, base_momentum=self.base_momentum, base_lr=self.base_lr,
        adjust_by_learning_rate=self.adjust_by_learning_rate)
    # The update sees F at the label resolution, without gradient (reference: no_grad).
    # The fused form reaches the same result from the low-resolution F.
    features = lax.stop_gradient(memory_input).astype(jnp.float32)
    if not self.fused_update:
      features = ops.resize_bilinear(features, labels.shape[1:3])      # (B, H, W, C)
    old = memory_module.get_variable('memory', 'memory')
    new = memory_module.update(features, labels, momentum=momentum,
                               ignore_index=self.ignore_index, strategy=self.update_strategy,
                               fused=self.fused_update)
    return None if old is None else (old, new)

  @nn.compact
  def __call__(self, images, *, train: bool = False, labels=None, lr=None,
               memory_loss: bool = False, valid_hw=None):
    """images (B, H, W, 3) normalised float32; labels (B, H, W) int; lr scalar (may be traced).

    `valid_hw` (B, 2) int, evaluation only: image b is the top-left (valid_hw[b]) of its
    zero-padded array; the logits' top-left ceil(valid_hw / 8) then equal those of the
    unpadded image (models/layers.py), so one compiled shape serves many image sizes.

    Returns {'logits'} in eval; in training also 'preds_stage1', 'preds_aux', 'memory_input'
    and, with `memory_loss`, 'preds_memory' (K * num_feats_per_cls, K).
    """
    if train and valid_hw is not None:
      raise ValueError('valid_hw is for evaluation only (train=False)')
    norm = self._norm_kwargs(train)
    features, valids = self._backbone(images, train, valid_hw)
    features, valids = self._downsample_backbone(features, valids, train)
    c5, valid = features[-1], valids[-1]
    feats_ms = None
    if self.use_context_within_image:
      feats_ms = self._context_module(train, 'context_within_image_module')(c5, valid)
    memory_input = ConvBNAct(self.feats_channels, 3, act=self.act, name='bottleneck',
                             **norm)(c5, valid)                            # (B, h, w, C)
    decoder_stage1 = DecoderHead(num_classes=self.num_classes, features=self.feats_channels,
                                 dropout=self.dropout, act=self.act, name='decoder_stage1', **norm)
    preds_stage1 = decoder_stage1(memory_input)                            # (B, h, w, K)
    memory_module = memory_lib.FeaturesMemory(
        num_classes=self.num_classes, feats_channels=self.feats_channels,
        transform_channels=self.transform_channels, out_channels=self.out_channels,
        num_feats_per_cls=self.num_feats_per_cls, use_hard_aggregate=self.use_hard_aggregate,
        use_context_within_image=self.use_context_within_image, act=self.act,
        name='memory_module', **norm)
    memory_values = None
    if train and labels is not None:
      memory_values = self._update_memory(memory_module, memory_input, labels, lr)
    _, memory_output = memory_module(memory_input, preds_stage1, feats_ms, valid,
                                     memory_values=memory_values)
    decoder_stage2 = DecoderHead(num_classes=self.num_classes, features=self.out_channels,
                                 dropout=self.dropout, act=self.act, name='decoder_stage2', **norm)
    preds_stage2 = decoder_stage2(memory_output)                           # (B, h, w, K)

    outputs = {'logits': preds_stage2.astype(jnp.float32)}
    self._auxiliary(features[:-1], outputs, train)
    if not train:
      return outputs
    outputs['preds_stage1'] = preds_stage1.astype(jnp.float32)
    outputs['memory_input'] = memory_input

    if memory_loss:
      # The memory after this step's update (the reference's returned tensor aliases it).
      memory = lax.stop_gradient(memory_module.get_variable('memory', 'memory'))   # (K, n, C)
      k, n, c = memory.shape
      preds_memory = decoder_stage2(memory.reshape(k * n, 1, 1, c).astype(self.dtype))
      outputs['preds_memory'] = preds_memory.reshape(k * n, self.num_classes).astype(jnp.float32)
    return outputs


class DeepLabV3(_Segmentor):
  """The DeepLabV3 baseline (reference `Deeplabv3`): backbone -> ASPP -> dropout + 1x1."""

  @nn.compact
  def __call__(self, images, *, train: bool = False, labels=None, lr=None,
               memory_loss: bool = False, valid_hw=None):
    """Same call as MCIBI; `labels`, `lr` and `memory_loss` are accepted and ignored."""
    del labels, lr, memory_loss  # no memory in the baseline
    if train and valid_hw is not None:
      raise ValueError('valid_hw is for evaluation only (train=False)')
    features, valids = self._backbone(images, train, valid_hw)
    if self.head_type != 'aspp':
      raise ValueError(f"model.head.type: DeepLabV3 uses ASPP, got {self.head_type!r}")
    feats = self._context_module(train, 'aspp_net')(features[-1], valids[-1])
    logits = ClassifierHead(num_classes=self.num_classes, dropout=self.dropout, train=train,
                            dtype=self.dtype, conv_impl=self.conv_impl, name='decoder')(feats)
    outputs = {'logits': logits.astype(jnp.float32)}
    self._auxiliary(features[:-1], outputs, train)
    return outputs
