"""The backbone registry: `config.model.backbone.type` -> the module that builds that backbone.

A backbone is one file in this folder plus one line in `REGISTRY`. Nothing else in the code
asks which backbone it is. The module defines:

- `build(cfg, **layer_kwargs) -> flax.linen.Module`: `cfg` is `config.model.backbone` as a plain
  dict (without `pretrained`); `layer_kwargs` are the segmentor's layer settings (`train`,
  `axis_name`, `bn_momentum`, `bn_eps`, `dtype`, `conv_impl`, `name`). Calling the module on
  images (B, H, W, 3) (and optionally `valid` (B, 2), see `SUPPORTS_VALID_HW`) returns the
  tuple of all its feature maps, NHWC; the segmentor picks the ones it uses by index
  (`model.backbone.selected_indices`, as the reference's `selected_indices`).
- `output_strides(cfg) -> tuple[int, ...]`: the stride of each returned map (a map of an
  H x W input is ceil(H / stride) x ceil(W / stride)).
- `check_config(cfg)`: raises ValueError, naming the key (`config.model.backbone.depth=34 ...`),
  for a value the backbone cannot build.
- `SUPPORTS_VALID_HW`: whether the module takes `valid` (zero-padded evaluation at fixed shapes,
  models/layers.py); evaluation runs each image at its exact size otherwise.
- optionally `torch_module_path(modules) -> str | None` (a reference module path for the Flax
  module path below `backbone_net`, when the generic rule of memseg_jax.convert does not give
  it) and `imagenet_state_dict(state_dict[, cfg]) -> (state_dict, ignored_keys)` (an ImageNet
  checkpoint in the reference backbone's key layout, and the keys the reference's
  `strict=False` load would ignore; a hook that takes a second argument gets `cfg`, e.g. to
  resize a position embedding to the configured grid).
- optionally honour `cfg['remat']` (set from `config.model.remat`): rematerialise each block
  in the backward pass (`nn.remat`) to save activation memory.
"""

import importlib

REGISTRY = {
    'resnet': 'memseg_jax.models.backbones.resnet',
    'resnest': 'memseg_jax.models.backbones.resnest',
    'hrnet': 'memseg_jax.models.backbones.hrnet',
    'vit': 'memseg_jax.models.backbones.vit',
}


def get(name: str):
  """The backbone module registered as `name`; ValueError naming the known types otherwise."""
  if name not in REGISTRY:
    raise ValueError(f'config.model.backbone.type={name!r} is not one of '
                     f'{", ".join(repr(n) for n in REGISTRY)}')
  return importlib.import_module(REGISTRY[name])
