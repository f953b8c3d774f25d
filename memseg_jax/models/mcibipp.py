"""The MCIBI++ segmentor (distribution memory; FCN, PSPNet, DeepLabV3 and UPerNet variants) and
the plain UPerNet baseline (memory off).

MCIBI++ forward (reference `ssseg/modules/models/segmentors/mcibiplusplus/mcibiplusplus.py`,
wave-2 spec 5.2, 5.3):

    C2..C5      = [backbone(images)[i] for i in selected_indices]
    feats_cwi   = context_within_image_module(C5)       # ASPP or PPM; absent in the FCN variant
    preds_cwi   = decoder_cwi(feats_cwi)
    F           = bottleneck(C5)                         # pixel representations (3x3 CBR)
    preds_pr    = decoder_pr(F)
    gather      = preds_pr if force_use_preds_pr or no context else preds_cwi
    read, out   = memory_module(F, gather)               # models/memory.py FeaturesMemoryV2
    with a context: out = self_attention(feats_cwi, out)        if use_self_attention
                    out = [out, feats_cwi]                      plain, or as the FPN's top:
                    UPerNetFPN([C2, C3, C4], [out, feats_cwi])  (models/heads.py)
    preds_cls   = decoder_cls(out)                       # the eval logits
    preds_aux   = auxiliary_decoder(C4)

In training, given the labels, the memory is then updated (per device, from F detached and
upsampled to the label size, or the equivalent fused form; the train step averages it across
devices). Losses (memseg_jax.losses): loss_cls 1.0, loss_pr 0.4, loss_cwi 1.0 (with a
context), loss_aux 0.4; no memory loss. The variants of the released models:

    FCN        no context; decoder_cls on the 512-channel memory output
    PSPNet     PPM context, segmentor self-attention, gathering from decoder_pr
    DeepLabV3  ASPP context, gathering from decoder_cwi (ADE20K: no self-attention, 3x3 cls)
    UPerNet    PPM context, gathering from decoder_cwi, FPN over C2..C4 with the
               concatenated memory output and context as its top level; logits at 1/4

Differences from the reference, on purpose: its forward reseeds torch's global RNG
(`torch.manual_seed` per class in the memory read), so its dropout masks repeat every
iteration; ours are drawn per step (memory.py). The reference's unused options
(`warmup_epoch` > 0, cascade `memory_gather_logits`, `fuse_memory_cwi_before_fpn=False`) are not
implemented; no shipped config sets them.

UPerNet (reference `upernet.py`): PPM on C5 as the top of the same FPN (512 channels), decoder
3x3 CBR + Dropout2d + classifier at 1/4, FCN auxiliary head on C4.
"""

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from memseg_jax import ops
from memseg_jax.models import memory as memory_lib
from memseg_jax.models.attention import SelfAttentionBlock
from memseg_jax.models.heads import NamedDecoderHead, UPerNetFPN, UPerNetHead
from memseg_jax.models.layers import ConvBNAct
from memseg_jax.models.mcibi import _Segmentor


def _first_level_stride(config) -> int:
  """Stride of the first selected backbone output (where UPerNet's logits live)."""
  from memseg_jax.models import backbone_config, backbone_module  # pylint: disable=import-outside-toplevel
  strides = backbone_module(config).output_strides(backbone_config(config))
  return int(strides[tuple(config.model.backbone.selected_indices)[0]])


class MCIBIPlusPlus(_Segmentor):
  """MCIBI++: the distribution memory with a context module (or none) and optionally an FPN."""
  transform_channels: int = 256
  out_channels: int = 512
  use_hard_aggregate: bool = False
  use_context_within_image: bool = False
  use_self_attention: bool = True
  force_use_preds_pr: bool = False
  downsample_before_sa: bool = False
  decoder_pr_kernel: int = 1
  decoder_cwi_kernel: int = 1
  decoder_cls_kernel: int = 1
  fpn: bool = False
  fpn_feats_channels: int = 1024
  fpn_out_channels: int = 512
  base_momentum: float = 0.1
  base_lr: float = 0.01
  adjust_by_learning_rate: bool = False
  fused_update: bool = True

  @classmethod
  def config_fields(cls, config) -> dict:
    mem, pp = config.model.memory, config.model.mcibipp
    return dict(
        transform_channels=mem.transform_channels,
        out_channels=mem.out_channels,
        use_hard_aggregate=mem.use_hard_aggregate,
        use_context_within_image=mem.use_context_within_image,
        base_momentum=mem.base_momentum,
        base_lr=mem.base_lr,
        adjust_by_learning_rate=mem.adjust_by_learning_rate,
        fused_update=mem.fused_update,
        use_self_attention=pp.use_self_attention,
        force_use_preds_pr=pp.force_use_preds_pr,
        downsample_before_sa=pp.downsample_before_sa,
        decoder_pr_kernel=pp.decoder_pr_kernel,
        decoder_cwi_kernel=pp.decoder_cwi_kernel,
        decoder_cls_kernel=pp.decoder_cls_kernel,
        fpn=pp.fpn,
        fpn_feats_channels=pp.fpn_feats_channels,
        fpn_out_channels=pp.fpn_out_channels)

  @classmethod
  def logits_stride(cls, config) -> int:
    if config.model.mcibipp.fpn:
      return _first_level_stride(config)
    return super().logits_stride(config)

  def _decoder(self, kernel_size, name, train):
    return NamedDecoderHead(num_classes=self.num_classes, features=self.feats_channels,
                            kernel_size=kernel_size, dropout=self.dropout, act=self.act,
                            name=name, **self._norm_kwargs(train))

  @nn.compact
  def __call__(self, images, *, train: bool = False, labels=None, lr=None,
               memory_loss: bool = False, valid_hw=None):
    """images (B, H, W, 3) normalised float32; labels (B, H, W) int; lr scalar (may be traced).

    `valid_hw` (B, 2) int, evaluation only: zero-padded images (models/layers.py). Returns
    {'logits'} in eval; in training also 'preds_pr', 'preds_cwi' (with a context),
    'preds_aux' and 'memory_input'. `memory_loss` is accepted and ignored (MCIBI++ has none).
    """
    del memory_loss
    if train and valid_hw is not None:
      raise ValueError('valid_hw is for evaluation only (train=False)')
    if self.fpn and not self.use_context_within_image:
      raise ValueError('model.mcibipp.fpn needs model.memory.use_context_within_image '
                       '(the FPN top level is [memory output, context])')
    norm = self._norm_kwargs(train)
    features, valids = self._backbone(images, train, valid_hw)
    c5, valid = features[-1], valids[-1]
    feats_cwi = preds_cwi = None
    if self.use_context_within_image:
      feats_cwi = self._context_module(train, 'context_within_image_module')(c5, valid)
      preds_cwi = self._decoder(self.decoder_cwi_kernel, 'decoder_cwi', train)(feats_cwi, valid)
    memory_input = ConvBNAct(self.feats_channels, 3, act=self.act, name='bottleneck',
                             **norm)(c5, valid)                            # (B, h, w, C)
    preds_pr = self._decoder(self.decoder_pr_kernel, 'decoder_pr', train)(memory_input, valid)
    gather = preds_pr if (self.force_use_preds_pr or preds_cwi is None) else preds_cwi
    memory_module = memory_lib.FeaturesMemoryV2(
        num_classes=self.num_classes, feats_channels=self.feats_channels,
        transform_channels=self.transform_channels, out_channels=self.out_channels,
        use_hard_aggregate=self.use_hard_aggregate,
        downsample_before_sa=self.downsample_before_sa, act=self.act, name='memory_module',
        **norm)
    _, memory_output = memory_module(memory_input, gather, valid)
    if feats_cwi is not None:
      if self.use_self_attention:
        memory_output = SelfAttentionBlock(
            transform_channels=self.feats_channels // 2, out_channels=self.feats_channels,
            act=self.act, name='self_attention', **norm)(feats_cwi, memory_output, valid)
      memory_output = jnp.concatenate([memory_output, feats_cwi], axis=-1)
      if self.fpn:
        memory_output = UPerNetFPN(
            feats_channels=self.fpn_feats_channels, out_channels=self.fpn_out_channels,
            act=self.act, name='fpn', **norm)(features[:-1], memory_output,
                                              None if valid_hw is None else valids)
        valid = valids[0]
    preds_cls = self._decoder(self.decoder_cls_kernel, 'decoder_cls', train)(memory_output,
                                                                            valid)
    outputs = {'logits': preds_cls.astype(jnp.float32)}
    self._auxiliary(features[:-1], outputs, train)
    if not train:
      return outputs
    outputs['preds_pr'] = preds_pr.astype(jnp.float32)
    if preds_cwi is not None:
      outputs['preds_cwi'] = preds_cwi.astype(jnp.float32)
    outputs['memory_input'] = memory_input
    if labels is not None:
      if lr is None and self.adjust_by_learning_rate:
        raise ValueError('MCIBI++: the memory update needs the learning rate `lr` of this step '
                         '(model.memory.adjust_by_learning_rate is on)')
      momentum = memory_lib.momentum_at(
          lr, base_momentum=self.base_momentum, base_lr=self.base_lr,
          adjust_by_learning_rate=self.adjust_by_learning_rate)
      # After the forward, before the losses (which do not read the memory), without gradient.
      update_features = lax.stop_gradient(memory_input).astype(jnp.float32)
      if not self.fused_update:
        update_features = ops.resize_bilinear(update_features, labels.shape[1:3])
      memory_module.update(update_features, labels, momentum=momentum,
                           ignore_index=self.ignore_index, fused=self.fused_update)
    return outputs


class UPerNet(_Segmentor):
  """The UPerNet baseline (reference `UPerNet`): backbone -> PPM + FPN + decoder at 1/4."""

  @classmethod
  def logits_stride(cls, config) -> int:
    return _first_level_stride(config)

  @nn.compact
  def __call__(self, images, *, train: bool = False, labels=None, lr=None,
               memory_loss: bool = False, valid_hw=None):
    """Same call as MCIBI; `labels`, `lr` and `memory_loss` are accepted and ignored."""
    del labels, lr, memory_loss  # no memory in the baseline
    if train and valid_hw is not None:
      raise ValueError('valid_hw is for evaluation only (train=False)')
    if self.head_type != 'ppm':
      raise ValueError(f"model.head.type: UPerNet uses a PPM, got {self.head_type!r}")
    features, valids = self._backbone(images, train, valid_hw)
    logits = UPerNetHead(num_classes=self.num_classes, feats_channels=self.feats_channels,
                         pool_scales=tuple(self.pool_scales), dropout=self.dropout,
                         act=self.act, name='head', **self._norm_kwargs(train))(
                             features, None if valid_hw is None else valids)
    outputs = {'logits': logits.astype(jnp.float32)}
    self._auxiliary(features[:-1], outputs, train)
    return outputs

