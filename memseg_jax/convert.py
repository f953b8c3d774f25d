r"""PyTorch checkpoints -> Flax variables: SSSegmentation MCIBI/DeepLabV3 models, ImageNet ResNets.

    python -m memseg_jax.convert --torch_checkpoint=mcibi_ade20k.pth \
        --config=configs/ade20k.py --output=/tmp/mcibi_ade20k_flax
    python -m memseg_jax.convert --imagenet --torch_checkpoint=resnet50_v1c-2cccc1ad.pth \
        --config=configs/ade20k.py --output=/tmp/resnet50_v1c_flax
    python -m memseg_jax.convert --imagenet --torch_checkpoint=jx_vit_large_p16_384-b3be5167.pth \
        --config=configs/ade20k_vitl.py --output=/tmp/vit_large_p16_384_flax

The mapping is derived, not listed: every leaf of the Flax variable tree of
`build_model(config)` (shapes from `jax.eval_shape`, nothing is allocated) gets the name the
reference gives it, by these rules:
- module `name_N` <-> `name.N` (list/Sequential entries: `layer1_0` <-> `layer1.0`, and nested
  ones `fuse_layers_1_0_0` <-> `fuse_layers.1.0.0`); a backbone module may name its own
  modules differently (`torch_module_path`, see memseg_jax/models/backbones);
- `ConvBNAct` children `conv`/`bn` <-> indices 0/1 of the reference Sequential, shifted by one
  inside the pooling branches (`global_branch`, PPM `branches.N`) whose index 0 is the pooling;
- decoder classifiers `classifier` <-> index 4 (index 1 in DeepLabV3's dropout + conv decoder);
- leaves: kernel/scale -> weight, BN mean/var -> running_mean/running_var; other parameters
  (e.g. a position embedding) and the memory keep their names and layouts. Conv kernels go
  OIHW -> HWIO, Linear weights (out, in) -> (in, out).
`num_batches_tracked` entries carry no information for inference or training and are dropped.
Any key missing, unexpected, or of the wrong shape is a ValueError that names it: a checkpoint
is either loaded completely or not at all.

`save_variables` / `restore_variables` write and read the variables dict with orbax; the
evaluation and prediction code restores converted checkpoints through `restore_variables`.
"""

import os
import re
from typing import Any, Dict, Mapping, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from memseg_jax import errors
from memseg_jax.models import build_model

_LEAF_NAMES = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
    ('memory', 'memory'): 'memory',
}
# Sequentials whose index 0 is a (parameter-free) pooling layer.
_POOLED_PARENT = re.compile(r'global_branch|branches_\d+')


def _split_indices(name: str) -> Tuple[str, ...]:
  """'fuse_layers_1_0_0' -> ('fuse_layers', '1', '0', '0'); 'layer1_0' -> ('layer1', '0')."""
  return tuple(re.split(r'_(?=\d+(?:_|$))', name))


def _torch_module_path(modules: Tuple[str, ...], backbone_type: str = 'resnet') -> str:
  if modules and modules[0] == 'backbone_net':
    from memseg_jax.models import backbones  # pylint: disable=import-outside-toplevel
    custom = getattr(backbones.get(backbone_type), 'torch_module_path', None)
    path = custom(tuple(modules[1:])) if custom else None
    if path is not None:
      return f'backbone_net.{path}' if path else 'backbone_net'
  parts = []
  for i, name in enumerate(modules):
    parent = modules[i - 1] if i > 0 else ''
    if name in ('conv', 'bn'):
      index = {'conv': 0, 'bn': 1}[name] + (1 if _POOLED_PARENT.fullmatch(parent) else 0)
      parts.append(str(index))
    elif name == 'classifier':
      parts.append('1' if parent == 'decoder' else '4')
    else:
      parts.extend(_split_indices(name))
  return '.'.join(parts)


def torch_key(flax_key: Tuple[str, ...], backbone_type: str = 'resnet') -> str:
  """('params', 'backbone_net', 'layer1_0', 'conv1', 'kernel') -> 'backbone_net.layer1.0.conv1.weight'."""
  collection, *modules, leaf = flax_key
  if (collection, leaf) in _LEAF_NAMES:
    leaf_name = _LEAF_NAMES[(collection, leaf)]
  elif collection == 'params':
    leaf_name = leaf            # a bare parameter (e.g. `pos_embed`) keeps its name
  else:
    raise ValueError(f'no PyTorch name for the Flax variable {"/".join(flax_key)}')
  path = _torch_module_path(tuple(modules), backbone_type)
  return f'{path}.{leaf_name}' if path else leaf_name


def variable_shapes(config) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """Flattened {(collection, *path): shape} of `build_model(config)`, without allocating."""
  model = build_model(config)
  rng = jax.random.PRNGKey(0)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init({'params': rng, 'dropout': rng}, x, train=False),
                          images)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  return {k: tuple(v.shape) for k, v in flat.items()}


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):   # torch.Tensor, without importing torch here
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _flax_value(torch_value: np.ndarray, shape: Tuple[int, ...], leaf: str = '') -> np.ndarray:
  if torch_value.ndim == 4 and len(shape) == 4 and leaf == 'kernel':
    torch_value = torch_value.transpose(2, 3, 1, 0)      # OIHW -> HWIO
  elif torch_value.ndim == 2 and len(shape) == 2 and leaf == 'kernel':
    torch_value = torch_value.T                          # Linear (out, in) -> Dense (in, out)
  return torch_value.astype(np.float32)


def _listing(keys, limit=20) -> str:
  keys = sorted(keys)
  text = ', '.join(keys[:limit])
  return text + (f' ... ({len(keys) - limit} more)' if len(keys) > limit else '')


def _convert(state_dict: Mapping[str, Any], expected: Mapping[str, Tuple[Tuple[str, ...], tuple]],
             what: str) -> Dict[str, Any]:
  """Strict conversion of `state_dict` onto `expected` = {torch key: (flax key, flax shape)}."""
  given = {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  missing = set(expected) - set(given)
  unexpected = set(given) - set(expected)
  problems = []
  if missing:
    problems.append(f'missing keys: {_listing(missing)}')
  if unexpected:
    problems.append(f'unexpected keys: {_listing(unexpected)}')
  flat, wrong_shape = {}, []
  for key in sorted(set(given) & set(expected)):
    flax_key, shape = expected[key]
    value = _flax_value(_to_numpy(given[key]), shape, flax_key[-1])
    if value.shape != shape:
      wrong_shape.append(f'{key} has shape {tuple(_to_numpy(given[key]).shape)}, '
                         f'expected {_torch_shape(shape, flax_key[-1])}')
      continue
    flat[flax_key] = value
  if wrong_shape:
    problems.append('wrong shapes: ' + '; '.join(wrong_shape[:20]))
  if problems:
    raise ValueError(f'{what} does not match the model of this config: ' + ' | '.join(problems))
  return flax.traverse_util.unflatten_dict(flat)


def _torch_shape(shape: Tuple[int, ...], leaf: str = 'kernel') -> Tuple[int, ...]:
  if len(shape) == 4 and leaf == 'kernel':
    h, w, i, o = shape
    return (o, i, h, w)
  if len(shape) == 2 and leaf == 'kernel':
    return shape[::-1]
  return shape


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
  if state_dict and all(k.startswith(prefix) for k in state_dict):
    return {k[len(prefix):]: v for k, v in state_dict.items()}
  return state_dict


def convert_state_dict(state_dict: Mapping[str, Any], shapes: Mapping[Tuple[str, ...], tuple],
                       what: str = 'the state_dict',
                       backbone_type: str = 'resnet') -> Dict[str, Any]:
  """Strict conversion onto any Flax variable tree given as flattened {(collection, *path): shape}.

  Used for whole models below and for single modules (a head, the backbone) in tests.
  """
  expected = {torch_key(k, backbone_type): (k, tuple(shape)) for k, shape in shapes.items()}
  return _convert(state_dict, expected, what)


def convert_ssseg_state_dict(state_dict: Mapping[str, Any], config) -> Dict[str, Any]:
  """An SSSegmentation MCIBI/DeepLabV3 state_dict -> {'params', 'batch_stats'[, 'memory']}.

  Values may be numpy arrays or torch tensors. Raises ValueError naming every missing,
  unexpected or wrongly shaped key.
  """
  state_dict = _strip_prefix(state_dict, 'module.')   # saved from a DDP-wrapped model
  return convert_state_dict(state_dict, variable_shapes(config), 'the checkpoint',
                            config.model.backbone.type)


def convert_imagenet(state_dict: Mapping[str, Any], config) -> Dict[str, Any]:
  """An ImageNet backbone state_dict -> {'params': {'backbone_net': ...}, 'batch_stats': ...}.

  Keys as the reference's backbone names them (open-mmlab `resnet50_v1c`: `stem.0.weight`,
  `layer1.0.conv1.weight`, ...); a 'state_dict' or 'model' wrapper is accepted. The backbone
  module's `imagenet_state_dict` maps other layouts (timm's ViT `blocks.0.attn.qkv.weight`,
  ... with a position embedding of another grid) and names the keys the reference's
  `strict=False` load ignores (an ImageNet classifier): they are dropped, counted in the log
  and named at debug level; any other mismatch is an error. The result initialises the
  backbone of `build_model(config)` (merge it into freshly initialised variables).
  """
  from absl import logging  # pylint: disable=import-outside-toplevel
  from memseg_jax.models import backbone_module  # pylint: disable=import-outside-toplevel
  for wrapper in ('state_dict', 'model'):
    if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
      state_dict = state_dict[wrapper]
      break
  hook = getattr(backbone_module(config), 'imagenet_state_dict', None)
  if hook is not None:
    state_dict, ignored = _imagenet_hook(hook, dict(state_dict), config)
    if ignored:
      logging.info('ImageNet checkpoint: %d keys the backbone does not use were ignored '
                   '(as the reference loads it with strict=False)', len(ignored))
      logging.debug('ignored ImageNet keys: %s', ', '.join(sorted(ignored)))
  backbone_type = config.model.backbone.type
  expected = {}
  for k, shape in variable_shapes(config).items():
    if len(k) > 1 and k[1] == 'backbone_net':
      expected[torch_key(k, backbone_type)[len('backbone_net.'):]] = (k, shape)
  return _convert(state_dict, expected, 'the ImageNet checkpoint')


def _imagenet_hook(hook, state_dict, config):
  """Calls a backbone's `imagenet_state_dict`; hooks taking two arguments get the backbone cfg."""
  import inspect  # pylint: disable=import-outside-toplevel
  from memseg_jax.models import backbone_config  # pylint: disable=import-outside-toplevel
  if len(inspect.signature(hook).parameters) >= 2:
    return hook(state_dict, backbone_config(config))
  return hook(state_dict)


# ------------------------------------------------------------------------------- files
class ConversionError(errors.UserError, ValueError):
  """A PyTorch checkpoint that cannot be read or does not fit the config (message names it)."""


def _read_torch_file(path: str):
  """The unpickled .pth; FileNotFoundError / ConversionError (one line) when it cannot be."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'PyTorch checkpoint not found: {path}')
  try:
    import torch  # the 'torch' extra; only conversion needs it
  except ImportError:
    raise ConversionError('reading a PyTorch checkpoint needs torch: pip install '
                          '"memseg_jax[torch]"') from None
  try:
    checkpoint = torch.load(path, map_location='cpu', weights_only=False)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f'cannot read PyTorch checkpoint {path}: {errors.one_line(e)}') from None
  if not isinstance(checkpoint, Mapping):
    raise ConversionError(f'{path}: expected a dict (state_dict or {{"model": state_dict}}), '
                          f'got {type(checkpoint).__name__}')
  return checkpoint


def load_ssseg_checkpoint(path: str, config) -> Dict[str, Any]:
  """Reads an SSSegmentation .pth ({'model': state_dict, ...} or a bare state_dict) and converts it."""
  checkpoint = _read_torch_file(path)
  state_dict = checkpoint.get('model', checkpoint)
  try:
    return convert_ssseg_state_dict(state_dict, config)
  except ValueError as e:
    raise ConversionError(f'{path}: {e}') from None


def load_imagenet_checkpoint(path: str, config) -> Dict[str, Any]:
  """Reads an ImageNet backbone .pth and converts it (see `convert_imagenet`)."""
  checkpoint = _read_torch_file(path)
  try:
    return convert_imagenet(checkpoint, config)
  except ValueError as e:
    raise ConversionError(f'{path}: {e}') from None


def save_variables(path: str, variables: Mapping[str, Any], overwrite: bool = False) -> str:
  """Writes the variables dict as an orbax checkpoint at `path` (made absolute); returns it."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(path, jax.tree_util.tree_map(np.asarray, dict(variables)), force=overwrite)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()
  return path


def restore_variables(path: str, target: Any = None) -> Dict[str, Any]:
  """Reads a checkpoint written by `save_variables` (optionally onto a `target` tree/shapes)."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'converted checkpoint not found: {path}')
  checkpointer = ocp.StandardCheckpointer()
  try:
    return checkpointer.restore(path) if target is None else checkpointer.restore(path, target)
  finally:
    checkpointer.close()     # no orbax thread outlives the call, also when it fails


def convert_file(torch_checkpoint: str, config, output: str, *, imagenet: bool = False,
                 overwrite: bool = False) -> Tuple[str, Dict[str, Any]]:
  """What `python -m memseg_jax.convert` does: (output path, variables); errors name the file."""
  output = os.path.abspath(output)
  if os.path.exists(output) and not overwrite:
    raise ConversionError(f'--output={output} already exists (pass --overwrite to replace it)')
  if imagenet:
    variables = load_imagenet_checkpoint(torch_checkpoint, config)
  else:
    variables = load_ssseg_checkpoint(torch_checkpoint, config)
  return save_variables(output, variables, overwrite=overwrite), variables


def main(argv):
  """The program (through `errors.run_program`: bad input ends it with one `error:` line)."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  path, variables = convert_file(_TORCH_CHECKPOINT.value, _CONFIG.value, _OUTPUT.value,
                                 imagenet=_IMAGENET.value, overwrite=_OVERWRITE.value)
  count = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables))
  print(f'wrote {count:,} values ({", ".join(sorted(variables))}) to {path}')


if __name__ == '__main__':
  # Flags are defined only when run as a script: importing this module from the trainer or the
  # evaluator (which define their own --config) must not register duplicates.
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file('config', None, 'model config (configs/*.py)')
  _TORCH_CHECKPOINT = flags.DEFINE_string('torch_checkpoint', None, 'PyTorch .pth file')
  _OUTPUT = flags.DEFINE_string('output', None, 'output orbax checkpoint directory')
  _IMAGENET = flags.DEFINE_bool('imagenet', False,
                                'the file is an ImageNet backbone (open-mmlab ResNet-v1c, '
                                'timm ViT)')
  _OVERWRITE = flags.DEFINE_bool('overwrite', False, 'replace an existing output directory')
  flags.mark_flags_as_required(['config', 'torch_checkpoint', 'output'])
  errors.run_program(main)
