"""Models: ResNet-v1c backbone, heads, the feature memory, MCIBI and the DeepLabV3 baseline.

`build_model(config)` is the one place that turns `config.model` into a Linen module:

    model = build_model(config)
    variables = model.init(rng, images)        # {'params', 'batch_stats', 'memory'}
    logits = model.apply(variables, images, train=False)['logits']   # (N, H/8, W/8, K)
"""

from typing import Optional

import jax.numpy as jnp

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def build_model(config, axis_name: Optional[str] = None):
  """MCIBI (`config.model.name == 'mcibi'`) or DeepLabV3 ('deeplabv3') from a full config.

  `axis_name` turns every BatchNorm into SyncBN over that mapped axis ('data' under the
  training mesh).
  """
  # Imported here so `memseg_jax.models.layers` etc. load without the whole model stack.
  from memseg_jax.models.mcibi import MCIBI, DeepLabV3

  m = config.model
  if m.dtype not in _DTYPES:
    raise ValueError(f'model.dtype: unknown dtype {m.dtype!r} (expected one of {sorted(_DTYPES)})')
  common = dict(
      num_classes=m.num_classes,
      backbone_depth=m.backbone.depth,
      output_stride=m.backbone.output_stride,
      contract_dilation=m.backbone.contract_dilation,
      head_type=m.head.type,
      feats_channels=m.head.feats_channels,
      dilations=tuple(m.head.dilations),
      pool_scales=tuple(m.head.pool_scales),
      dropout=m.head.dropout,
      aux_enabled=m.auxiliary.enabled,
      aux_channels=m.auxiliary.channels,
      aux_dropout=m.auxiliary.dropout,
      act=m.act,
      bn_momentum=m.bn_momentum,
      bn_eps=m.bn_eps,
      ignore_index=config.data.ignore_index,
      axis_name=axis_name,
      dtype=_DTYPES[m.dtype],
  )
  if m.name == 'deeplabv3':
    return DeepLabV3(**common)
  if m.name == 'mcibi':
    mem = m.memory
    return MCIBI(
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
        **common)
  raise ValueError(f"model.name: unknown model {m.name!r} (expected 'mcibi' or 'deeplabv3')")
