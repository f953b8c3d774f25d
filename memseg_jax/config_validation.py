"""Config files: loading them by path, and checking a config before anything is compiled.

`load_config(path)` reads a config file ('configs/ade20k.py', optionally 'configs/ade20k.py:arg')
the way `--config` does; config files import their base with `load_sibling_config(__file__,
'default')`, which works from any working directory.


`validate(config, num_devices)` raises `ConfigError` for the first value that cannot work; its
message is one line that names the key, the value and what would be accepted, e.g.

    config.train.batch_size=7 is not divisible by the 8 devices

`memseg_jax.main` prints that line and exits with status 1. Values that only the data pipeline
can judge (a dataset not prepared yet) are reported by the pipeline itself;
`check_num_classes(config)` compares config.model.num_classes with the dataset's classes (the
trainer calls it first; evaluation after the checkpoint's own shapes were checked, so that a
checkpoint of another class count is reported as such).
"""

import importlib.util
import os
from typing import Any, Sequence

from memseg_jax.errors import UserError

KNOWN_DATASETS = ('ade20k', 'cityscapes', 'lip', 'cocostuff10k', 'synthetic_scenes')
HEAD_TYPES = ('aspp', 'ppm')
ACTIVATIONS = ('relu', 'leaky_relu')
DTYPES = ('float32', 'bfloat16')
STRATEGIES = ('cosine_similarity', 'mean')
CONV_IMPLS = ('auto', 'native', 'taps')
INFERENCE_MODES = ('whole', 'slide')


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names the key."""


def _load_module(path: str):
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file not found: {path}')
  name = 'memseg_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sibling_config(config_file: str, name: str):
  """The config module `name`.py next to `config_file` (a config's `__file__`)."""
  return _load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), name + '.py'))


def load_config(path: str):
  """`get_config()` of a config file; 'file.py:arg' passes `arg` to get_config(arg)."""
  path, _, arg = path.partition(':')
  module = _load_module(path)
  return module.get_config(arg) if arg else module.get_config()


def _get(config, key: str) -> Any:
  value = config
  for part in key.split('.'):
    try:
      value = value[part]
    except (KeyError, AttributeError, TypeError):
      raise ConfigError(f'config.{key} is missing') from None
  return value


def _fail(key, value, why):
  raise ConfigError(f'config.{key}={value!r} {why}')


def _one_of(config, key, allowed: Sequence[Any]):
  value = _get(config, key)
  if value not in allowed:
    _fail(key, value, f'is not one of {", ".join(repr(a) for a in allowed)}')
  return value


def _number(config, key, *, positive=False, non_negative=False, integer=False, at_most=None):
  value = _get(config, key)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    _fail(key, value, 'is not a number')
  if integer and int(value) != value:
    _fail(key, value, 'is not an integer')
  if positive and not value > 0:
    _fail(key, value, 'must be > 0')
  if non_negative and not value >= 0:
    _fail(key, value, 'must be >= 0')
  if at_most is not None and value > at_most:
    _fail(key, value, f'must be <= {at_most}')
  return value


def _size_pair(config, key):
  value = _get(config, key)
  try:
    ok = len(value) == 2 and all(int(v) == v and v > 0 for v in value)
  except TypeError:
    ok = False
  if not ok:
    _fail(key, tuple(value) if isinstance(value, (list, tuple)) else value,
          'must be two positive integers (height, width)')
  return tuple(int(v) for v in value)


def _positive_sequence(config, key, *, allow_empty=False):
  value = _get(config, key)
  try:
    items = list(value)
    ok = (allow_empty or items) and all(float(v) > 0 for v in items)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    _fail(key, value, 'must be a non-empty sequence of positive numbers')
  return items


def _backbone(config):
  """The backbone's type and its own keys (checked by its module in models/backbones)."""
  from memseg_jax import models  # pylint: disable=import-outside-toplevel
  _one_of(config, 'model.backbone.type', tuple(models.backbones.REGISTRY))
  module = models.backbone_module(config)
  try:
    module.check_config(models.backbone_config(config))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  num_outputs = len(module.output_strides(models.backbone_config(config)))
  indices = _get(config, 'model.backbone.selected_indices')
  try:
    ok = len(indices) > 0 and all(int(i) == i and 0 <= i < num_outputs for i in indices)
  except TypeError:
    ok = False
  if not ok:
    _fail('model.backbone.selected_indices', indices,
          f'must be indices of the backbone\'s {num_outputs} outputs')


def _auxiliary_heads(config):
  """num_convs / upsample / num_heads of model.auxiliary (absent keys: the FCN head's values)."""
  aux = _get(config, 'model.auxiliary')
  for key, minimum in (('num_convs', 0), ('upsample', 0), ('num_heads', 1)):
    value = aux.get(key, minimum if key != 'num_convs' else 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      _fail(f'model.auxiliary.{key}', value, f'must be an integer >= {minimum}')


def _params_rules(config):
  """train.params_rules: a sequence of (pattern, lr_multiplier, wd_multiplier)."""
  rules = _get(config, 'train').get('params_rules', ()) or ()
  for i, rule in enumerate(rules):
    ok = (isinstance(rule, (list, tuple)) and len(rule) == 3 and isinstance(rule[0], str)
          and rule[0] and all(not isinstance(v, bool) and isinstance(v, (int, float)) and v >= 0
                              for v in rule[1:]))
    if not ok:
      _fail(f'train.params_rules[{i}]', rule,
            'must be (name pattern, lr_multiplier >= 0, wd_multiplier >= 0)')


def validate(config, num_devices: int = 1) -> None:
  """Raises ConfigError (one line, naming the key) for the first unusable value."""
  # model
  from memseg_jax import models  # pylint: disable=import-outside-toplevel
  name = _one_of(config, 'model.name', tuple(models.SEGMENTORS))
  _number(config, 'model.num_classes', positive=True, integer=True, at_most=254)
  _one_of(config, 'model.dtype', DTYPES)
  _one_of(config, 'model.act', ACTIVATIONS)
  _number(config, 'model.bn_eps', positive=True)
  _number(config, 'model.bn_momentum', non_negative=True, at_most=1)
  _one_of(config, 'model.conv_impl', CONV_IMPLS)
  _backbone(config)
  head_type = _one_of(config, 'model.head.type', HEAD_TYPES)
  if name == 'deeplabv3' and head_type != 'aspp':
    _fail('model.head.type', head_type, "must be 'aspp' for model.name='deeplabv3'")
  if name == 'upernet' and head_type != 'ppm':
    _fail('model.head.type', head_type, "must be 'ppm' for model.name='upernet'")
  _number(config, 'model.head.feats_channels', positive=True, integer=True)
  _positive_sequence(config, 'model.head.dilations')
  _positive_sequence(config, 'model.head.pool_scales')
  _number(config, 'model.head.dropout', non_negative=True, at_most=1)
  if 'downsample_backbone_stride' in _get(config, 'model.head'):
    _number(config, 'model.head.downsample_backbone_stride', positive=True, integer=True)
  if _get(config, 'model.auxiliary.enabled'):
    _number(config, 'model.auxiliary.channels', positive=True, integer=True)
    _number(config, 'model.auxiliary.dropout', non_negative=True, at_most=1)
    _auxiliary_heads(config)
  if name == 'mcibi':
    _number(config, 'model.memory.num_feats_per_cls', positive=True, integer=True)
    _number(config, 'model.memory.transform_channels', positive=True, integer=True)
    _number(config, 'model.memory.out_channels', positive=True, integer=True)
    _one_of(config, 'model.memory.update_strategy', STRATEGIES)
    _number(config, 'model.memory.base_momentum', non_negative=True)
    if _get(config, 'model.memory.adjust_by_learning_rate'):
      _number(config, 'model.memory.base_lr', positive=True)
  if name == 'mcibipp':
    _validate_mcibipp(config)

  # loss weights
  for key in ('stage2', 'stage1', 'aux', 'memory'):
    _number(config, f'loss.{key}', non_negative=True)

  # data
  data_name = _get(config, 'data.name')
  if str(data_name).partition('/')[0] not in KNOWN_DATASETS:
    _fail('data.name', data_name, f'is not one of {", ".join(repr(a) for a in KNOWN_DATASETS)}')
  ignore = _number(config, 'data.ignore_index', integer=True)
  if 0 <= ignore < _get(config, 'model.num_classes'):
    _fail('data.ignore_index', ignore, 'must not be a class index (< model.num_classes)')
  _size_pair(config, 'data.crop_size')
  _size_pair(config, 'data.train_scale')
  _size_pair(config, 'data.eval_scale')
  ratio = _get(config, 'data.ratio_range')
  if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
    _fail('data.ratio_range', tuple(ratio), 'must be (low, high) with 0 < low <= high')
  _number(config, 'data.flip_prob', non_negative=True, at_most=1)
  _number(config, 'data.rotate_prob', non_negative=True, at_most=1)
  _number(config, 'data.cat_max_ratio', positive=True, at_most=1)
  for key in ('data.mean', 'data.std'):
    if len(_get(config, key)) != 3:
      _fail(key, tuple(_get(config, key)), 'must have 3 values (R, G, B)')
  _positive_sequence(config, 'data.std')
  _number(config, 'data.num_train_images', positive=True, integer=True)

  # train
  batch = _number(config, 'train.batch_size', positive=True, integer=True)
  if batch % num_devices:
    raise ConfigError(f'config.train.batch_size={batch} is not divisible by the '
                      f'{num_devices} devices')
  if _get(config, 'train.num_train_steps') <= 0:
    _number(config, 'train.num_epochs', positive=True, integer=True)
  _number(config, 'train.num_train_steps', integer=True)
  _number(config, 'train.lr', positive=True)
  lr_min = _get(config, 'train.lr_min')
  if lr_min > _get(config, 'train.lr'):
    _fail('train.lr_min', lr_min, 'must be <= config.train.lr (or < 0 for 1% of it)')
  _number(config, 'train.lr_power', positive=True)
  _number(config, 'train.momentum', non_negative=True, at_most=1)
  _number(config, 'train.weight_decay', non_negative=True)
  _params_rules(config)
  _number(config, 'train.log_every_steps', positive=True, integer=True)
  _number(config, 'train.checkpoint_every_steps', positive=True, integer=True)
  _number(config, 'train.keep_checkpoints', positive=True, integer=True)
  _number(config, 'train.eval_every_steps', non_negative=True, integer=True)

  # eval / inference
  _number(config, 'eval.batch_size', positive=True, integer=True)
  _one_of(config, 'inference.mode', INFERENCE_MODES)
  _one_of(config, 'inference.padded_whole', (True, False))
  _size_pair(config, 'inference.crop_size')
  _size_pair(config, 'inference.stride')
  _number(config, 'inference.windows_per_call', positive=True, integer=True)
  _positive_sequence(config, 'inference.scales')


def check_num_classes(config) -> None:
  """ConfigError unless config.model.num_classes is the class count of config.data.name."""
  from memseg_jax import datasets  # pylint: disable=import-outside-toplevel
  k = int(config.model.num_classes)
  info = datasets.get_dataset_info(config.data.name)
  if info.num_classes != k:
    raise ConfigError(f'config.model.num_classes={k} but dataset {config.data.name!r} has '
                      f'{info.num_classes} classes')


def _validate_mcibipp(config):
  """The MCIBI++ keys (model.memory, model.mcibipp, loss.cwi); see configs/default.py."""
  from memseg_jax.models import memory  # pylint: disable=import-outside-toplevel
  _number(config, 'model.memory.transform_channels', positive=True, integer=True)
  out = _number(config, 'model.memory.out_channels', positive=True, integer=True)
  _number(config, 'model.memory.base_momentum', non_negative=True, at_most=1)
  if _get(config, 'model.memory.adjust_by_learning_rate'):
    _number(config, 'model.memory.base_lr', positive=True)
  try:   # the stored noise of the memory read covers these sizes only
    memory.memory_noise(int(_get(config, 'model.num_classes')),
                        int(_get(config, 'model.head.feats_channels')))
  except ValueError as e:
    raise ConfigError(f'config.{e}') from None
  for key in ('decoder_pr_kernel', 'decoder_cwi_kernel', 'decoder_cls_kernel'):
    _one_of(config, f'model.mcibipp.{key}', (1, 3))
  if _get(config, 'model.mcibipp.fpn'):
    if not _get(config, 'model.memory.use_context_within_image'):
      _fail('model.mcibipp.fpn', True, 'needs config.model.memory.use_context_within_image '
            '(the FPN top level is [memory output, context])')
    feats = _get(config, 'model.head.feats_channels')
    lateral = _number(config, 'model.mcibipp.fpn_feats_channels', positive=True, integer=True)
    if lateral != out + feats:
      _fail('model.mcibipp.fpn_feats_channels', lateral,
            f'must equal model.memory.out_channels + model.head.feats_channels = {out + feats} '
            '(the top level is added to the laterals)')
    _number(config, 'model.mcibipp.fpn_out_channels', positive=True, integer=True)
  _number(config, 'loss.cwi', non_negative=True)
