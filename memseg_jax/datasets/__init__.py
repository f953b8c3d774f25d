"""Dataset registry: one tfds builder per dataset, plus its class names, palette and splits.

    info = get_dataset_info('ade20k')          # num_classes, class_names, palette, ignore_index
    builder = get_builder('ade20k', data_dir)  # a tfds builder (prepared or not)
    builder = require_prepared('ade20k', data_dir)   # clear error + command if not prepared

Builder modules are imported lazily (tfds is slow to import). A name may carry a builder
config: 'synthetic_scenes/ade'. The tfds data dir is `data_dir`, else $MEMSEG_DATA_DIR, else
~/tensorflow_datasets.
"""

import importlib
import os
from typing import Optional

from memseg_jax.datasets._base import DatasetMeta, PreparationError  # noqa: F401
from memseg_jax.errors import UserError

_MODULES = {
    'ade20k': ('ade20k', 'Ade20k'),
    'cityscapes': ('cityscapes', 'Cityscapes'),
    'lip': ('lip', 'Lip'),
    'cocostuff10k': ('cocostuff10k', 'Cocostuff10k'),
    'synthetic_scenes': ('synthetic_scenes', 'SyntheticScenes'),
}
NAMES = tuple(_MODULES)


class DatasetNotPreparedError(UserError, FileNotFoundError):
  """The dataset has not been prepared in the tfds data dir (the message says how to)."""


class UnknownDatasetError(UserError, ValueError):
  """A dataset name that is not in the registry (the message lists the known ones)."""


def _split_name(name: str):
  base, _, config = name.partition('/')
  if base not in _MODULES:
    raise UnknownDatasetError(f'unknown dataset {name!r}; known: {", ".join(NAMES)}')
  return base, (config or None)


def _module(name: str):
  base, _ = _split_name(name)
  return importlib.import_module(f'memseg_jax.datasets.{_MODULES[base][0]}')


def get_dataset_info(name: str) -> DatasetMeta:
  """Static facts of a dataset: name, num_classes, class_names, palette, ignore_index."""
  return _module(name).META


def resolve_data_dir(data_dir: Optional[str] = None) -> str:
  """The tfds data dir: `data_dir`, else $MEMSEG_DATA_DIR, else ~/tensorflow_datasets."""
  d = data_dir or os.environ.get('MEMSEG_DATA_DIR') or '~/tensorflow_datasets'
  return os.path.abspath(os.path.expanduser(d))


def get_builder(name: str, data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
                **kwargs):
  """The tfds builder of `name` ('synthetic_scenes/ade' selects a config).

  Args:
    name: a registry name, optionally '/config'.
    data_dir: tfds data dir (see `resolve_data_dir`).
    manual_dir: folder with the official download (only needed to prepare).
    **kwargs: passed to the builder (`config=` a BuilderConfig instance, `skip_corrupt=`).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  base, config = _split_name(name)
  cls = getattr(_module(name), _MODULES[base][1])
  if config is not None and 'config' not in kwargs:
    # Named configs outside the builder's predefined list (e.g. registered synthetic sizes).
    kwargs['config'] = getattr(_module(name), 'CONFIGS', {}).get(config, config)
  builder = cls(data_dir=resolve_data_dir(data_dir), **kwargs)
  if manual_dir:
    # pylint: disable-next=protected-access
    builder._memseg_manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  return builder


def download_and_prepare(builder, manual_dir: Optional[str] = None):
  """Prepares `builder` from `manual_dir` (or the one given to `get_builder`)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  manual_dir = manual_dir or getattr(builder, '_memseg_manual_dir', None)
  kwargs = {}
  if manual_dir:
    kwargs['manual_dir'] = os.path.abspath(os.path.expanduser(manual_dir))
    # Checked here: tfds would fail with an AssertionError of its own.
    if not os.path.isdir(kwargs['manual_dir']):
      raise PreparationError(f'manual_dir {kwargs["manual_dir"]} does not exist or is not a '
                             'folder')
    if not os.listdir(kwargs['manual_dir']):
      raise PreparationError(f'manual_dir {kwargs["manual_dir"]} is empty (put the official '
                             'download there)')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(**kwargs))
  return builder


def is_prepared(builder) -> bool:
  return os.path.exists(os.path.join(builder.data_dir, 'dataset_info.json'))


def prepare_command(name: str, data_dir: Optional[str] = None) -> str:
  data_dir = resolve_data_dir(data_dir)
  manual = '' if name.startswith('synthetic_scenes') else ' --manual_dir=/path/to/download'
  return (f'python scripts/prepare_datasets.py --dataset={name}{manual} '
          f'--data_dir={data_dir}')


def require_prepared(name: str, data_dir: Optional[str] = None, **kwargs):
  """The builder of a prepared dataset, or a `DatasetNotPreparedError` saying what to run."""
  builder = get_builder(name, data_dir, **kwargs)
  if not is_prepared(builder):
    raise DatasetNotPreparedError(
        f'dataset {name!r} is not prepared: expected it under {builder.data_dir} (tfds data '
        f'dir {resolve_data_dir(data_dir)}, from config.data.data_dir or $MEMSEG_DATA_DIR or '
        f'~/tensorflow_datasets). Prepare it with: {prepare_command(name, data_dir)}')
  return builder


def resolve_split(name: str, split: str) -> str:
  """A split name after the dataset's aliases ('val' -> 'validation', 'trainval' -> ...)."""
  aliases = dict(get_dataset_info(name).split_aliases)
  return aliases.get(split, split)
