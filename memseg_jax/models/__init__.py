"""Models: backbones (registry in `backbones/`), heads, the feature memory and the segmentors.

`build_model(config)` is the one place that turns `config.model` into a Linen module:

    model = build_model(config)
    variables = model.init(rng, images)        # {'params', 'batch_stats', 'memory'}
    logits = model.apply(variables, images, train=False)['logits']   # (N, H/s, W/s, K)

`config.model.name` picks the segmentor (`SEGMENTORS`), `config.model.backbone.type` the
backbone (`backbones.REGISTRY`). A segmentor class reads its own config fields in
`config_fields(config)`; the fields every segmentor shares are read here.
"""

import importlib
from typing import Optional

import jax.numpy as jnp

from memseg_jax.models import backbones
from memseg_jax.models.layers import resolve_conv_impl

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# config.model.name -> (module, class) of the segmentor.
SEGMENTORS = {
    'mcibi': ('memseg_jax.models.mcibi', 'MCIBI'),
    'deeplabv3': ('memseg_jax.models.mcibi', 'DeepLabV3'),
    'mcibipp': ('memseg_jax.models.mcibipp', 'MCIBIPlusPlus'),
    'upernet': ('memseg_jax.models.mcibipp', 'UPerNet'),
}


def segmentor_class(name: str):
  """The Linen class of `config.model.name`; ValueError naming the known names otherwise."""
  if name not in SEGMENTORS:
    raise ValueError(f'config.model.name={name!r} is not one of '
                     f'{", ".join(repr(n) for n in SEGMENTORS)}')
  module, cls = SEGMENTORS[name]
  return getattr(importlib.import_module(module), cls)


def _freeze(value):
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def backbone_config(config) -> dict:
  """`config.model.backbone` as a plain dict without `pretrained` (a file, not structure)."""
  cfg = {k: _freeze(v) for k, v in config.model.backbone.to_dict().items()}
  cfg.pop('pretrained', None)
  return cfg


def backbone_module(config):
  """The module in `memseg_jax.models.backbones` that builds this config's backbone."""
  return backbones.get(config.model.backbone.type)


def logits_stride(config) -> int:
  """The stride s of the model's logits: an H x W image gives ceil(H / s) x ceil(W / s)."""
  return segmentor_class(config.model.name).logits_stride(config)


def supports_valid_hw(config) -> bool:
  """Whether the model takes `valid_hw` (zero-padded evaluation at fixed shapes)."""
  cls = segmentor_class(config.model.name)
  return bool(cls.SUPPORTS_VALID_HW and backbone_module(config).SUPPORTS_VALID_HW)


def build_model(config, axis_name: Optional[str] = None, *, platform: Optional[str] = None):
  """The segmentor of `config.model` (see `SEGMENTORS`).

  `axis_name` turns every BatchNorm into SyncBN over that mapped axis ('data' under the
  training mesh). `platform` is the platform of the devices the model will run on (the mesh's:
  'cpu', 'tpu', 'gpu'); it resolves `config.model.conv_impl='auto'` to the convolution form for
  those devices (models/layers.py). Without it, 'auto' is decided when the step is lowered.
  """
  m = config.model
  if m.dtype not in _DTYPES:
    raise ValueError(f'model.dtype: unknown dtype {m.dtype!r} (expected one of {sorted(_DTYPES)})')
  cls = segmentor_class(m.name)
  backbone = backbone_config(config)
  backbones.get(backbone['type'])          # a clear error for an unknown type
  common = dict(
      num_classes=m.num_classes,
      backbone=tuple(sorted(backbone.items())),
      selected_indices=tuple(m.backbone.selected_indices),
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
      conv_impl=resolve_conv_impl(m.get('conv_impl', 'auto'), platform),
      # ViT-L head additions and rematerialisation (absent from older saved configs).
      norm_layers=bool(m.head.get('norm_layers', False)),
      norm_eps=float(m.head.get('norm_eps', 1e-6)),
      aux_num_convs=int(m.auxiliary.get('num_convs', 1)),
      aux_upsample=int(m.auxiliary.get('upsample', 0)),
      aux_num_heads=int(m.auxiliary.get('num_heads', 1)),
      remat=bool(m.get('remat', False)),
  )
  return cls(**common, **cls.config_fields(config))
