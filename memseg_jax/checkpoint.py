"""Training checkpoints (orbax) and the initialisations that come from files.

- `create_manager(workdir, config)`: an async orbax `CheckpointManager` on
  `<workdir>/checkpoints` (absolute path), keeping the last `config.train.keep_checkpoints`.
- `restore_latest(manager, abstract_state)`: the newest complete checkpoint onto the structure
  of the current config's TrainState, or None for a fresh workdir. The checkpoint carries
  everything a resumed run needs: params, optimizer state, BN statistics, the memory, the step
  (which is also the position in the data stream) and the base random key.
- `check_tree_matches`: a checkpoint written for another config (other depth, classes, ...)
  fails with one message naming the missing, unexpected and wrongly shaped keys instead of an
  orbax stack trace.
- `load_pretrained_backbone(config, variables)`: the ImageNet ResNet-v1c weights
  (`config.model.backbone.pretrained`: an orbax directory written by
  `python -m memseg_jax.convert --imagenet ...`, or an open-mmlab .pth converted on the fly)
  replace the backbone's params and BN statistics of freshly initialised variables.
- `load_eval_variables(config, workdir, abstract_variables)`: the {'params', 'batch_stats',
  'memory'} to evaluate: `config.eval.checkpoint` (a training workdir/checkpoints folder or a
  converted checkpoint) or the latest checkpoint of the workdir.

Work directories may be local or on a remote filesystem such as Cloud Storage (`gs://...`):
`absolute_path` leaves URLs as they are, orbax reads and writes them itself, and the other
file operations here go through `tf.io.gfile` (`gfile()`), which knows the same schemes.
Training checkpoints are written collectively: every process calls `save` for the same step.
"""

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = 'checkpoints'


class CheckpointMismatchError(ValueError):
  """A checkpoint whose variables do not fit the model built from the config."""


# ---------------------------------------------------------------------------------- tree checks
def _path_name(path) -> str:
  parts = []
  for entry in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return '.'.join(parts)


def leaf_shapes(tree) -> Dict[str, Tuple[int, ...]]:
  """{'params.backbone_net.stem...': shape} for every array-like leaf (None leaves skipped)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape') and not isinstance(x, Mapping))
  return {_path_name(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, 'shape')}


def _listing(names, limit=12) -> str:
  # The model's own variables first; optimizer slots repeat the params' story.
  names = sorted(names, key=lambda n: (n.startswith('opt_state'), n))
  more = f' (+{len(names) - limit} more)' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


def check_tree_matches(expected: Mapping[str, Tuple[int, ...]],
                       found: Mapping[str, Tuple[int, ...]], what: str) -> None:
  """Raises CheckpointMismatchError naming every missing, unexpected and mis-shaped key."""
  missing = set(expected) - set(found)
  unexpected = set(found) - set(expected)
  shapes = [f'{k}: {found[k]} in {what}, {expected[k]} expected'
            for k in sorted(set(expected) & set(found)) if tuple(found[k]) != tuple(expected[k])]
  problems = []
  if missing:
    problems.append(f'missing keys: {_listing(missing)}')
  if unexpected:
    problems.append(f'unexpected keys: {_listing(unexpected)}')
  if shapes:
    problems.append(f'wrong shapes: {_listing(shapes, 6)}')
  if problems:
    raise CheckpointMismatchError(
        f'{what} does not match the model of this config ({"; ".join(problems)})')


# ----------------------------------------------------------------------------------- paths
def is_url(path: str) -> bool:
  """True for 'gs://bucket/dir' and other scheme://... paths (handled by tf.io.gfile / orbax)."""
  return '://' in str(path)


def absolute_path(path: str) -> str:
  """Local paths made absolute (orbax needs that); URLs unchanged, without a trailing '/'."""
  path = str(path)
  return path.rstrip('/') if is_url(path) else os.path.abspath(path)


def gfile():
  """tf.io.gfile: one file API for local paths and gs:// (TensorFlow imported on first use)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.io.gfile


# ----------------------------------------------------------------------------- train checkpoints
def checkpoint_dir(workdir: str) -> str:
  return os.path.join(absolute_path(workdir), CHECKPOINT_SUBDIR)


def create_manager(workdir: str, config, *, read_only: bool = False) -> ocp.CheckpointManager:
  """Async CheckpointManager under <workdir>/checkpoints keeping config.train.keep_checkpoints."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(config.train.keep_checkpoints), create=not read_only,
      read_only=read_only, enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
  """Starts an async save of `state` as checkpoint `step` (waits for a previous one first)."""
  manager.save(int(step), args=ocp.args.StandardSave(state), force=True)


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract_state, what: str):
  metadata = manager.item_metadata(step)
  tree = getattr(metadata, 'tree', metadata)
  if tree is not None:
    check_tree_matches(leaf_shapes(abstract_state), leaf_shapes(tree), what)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def restore_latest(manager: ocp.CheckpointManager, abstract_state) -> Optional[Any]:
  """The latest checkpoint restored onto `abstract_state` (shapes/dtypes/shardings), or None."""
  step = manager.latest_step()
  if step is None:
    return None
  what = f'checkpoint {os.path.join(str(manager.directory), str(step))}'
  return _restore_step(manager, step, abstract_state, what)


# ------------------------------------------------------------------------ pretrained backbone
def load_pretrained_backbone(config, variables: Mapping[str, Any]) -> Dict[str, Any]:
  """Freshly initialised `variables` with the backbone taken from config.model.backbone.pretrained.

  Only `params['backbone_net']` and `batch_stats['backbone_net']` are replaced; every key and
  shape of the file must match the backbone of this config (else CheckpointMismatchError).
  """
  path = config.model.backbone.pretrained
  if not path:
    return dict(variables)
  from memseg_jax import convert  # pylint: disable=import-outside-toplevel
  if not gfile().exists(path):
    raise FileNotFoundError(f'config.model.backbone.pretrained: no such file or directory: {path}')
  if not gfile().isdir(path):
    loaded = convert.load_imagenet_checkpoint(path, config)
  else:
    loaded = convert.restore_variables(path)
  out = {k: dict(v) for k, v in variables.items()}
  for collection in ('params', 'batch_stats'):
    if 'backbone_net' not in variables.get(collection, {}):
      continue      # a backbone without this collection (the ViT has no batch_stats)
    expected = {'backbone_net': variables[collection]['backbone_net']}
    got = loaded.get(collection, {})
    if set(got) != {'backbone_net'}:
      got = {'backbone_net': got.get('backbone_net', got)}
    check_tree_matches(leaf_shapes(expected), leaf_shapes(got),
                       f'pretrained backbone {path} ({collection})')
    out[collection]['backbone_net'] = jax.tree_util.tree_map(
        lambda ref, new: np.asarray(new, dtype=ref.dtype), expected['backbone_net'],
        got['backbone_net'])
  return out


# -------------------------------------------------------------------------------- evaluation
def _is_manager_dir(path: str) -> bool:
  return gfile().isdir(path) and any(name.rstrip('/').isdigit()
                                     for name in gfile().listdir(path))


def load_eval_variables(config, workdir: str, abstract_state) -> Tuple[Dict[str, Any], int]:
  """(variables, step) to evaluate, from config.eval.checkpoint or the workdir's latest checkpoint.

  `abstract_state` is the TrainState structure of this config (see train.abstract_train_state).
  `config.eval.checkpoint` may be a folder of training checkpoints (its latest is used), one
  training checkpoint step folder, or a converted checkpoint (`memseg_jax.convert`); step is
  -1 for the latter.
  """
  path = config.eval.checkpoint or checkpoint_dir(workdir)
  path = absolute_path(path)
  if not gfile().exists(path):
    raise FileNotFoundError(f'no checkpoint to evaluate at {path} (train first, or set '
                            '--config.eval.checkpoint=DIR)')
  if os.path.basename(path) != CHECKPOINT_SUBDIR and \
      gfile().isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
    path = os.path.join(path, CHECKPOINT_SUBDIR)
  if _is_manager_dir(path) or gfile().isdir(os.path.join(path, 'default')):
    if _is_manager_dir(path):
      parent, step = path, None
    else:
      parent, step = os.path.dirname(path), int(os.path.basename(path))
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(parent, options=options) as manager:
      step = manager.latest_step() if step is None else step
      if step is None:
        raise FileNotFoundError(f'no complete checkpoint in {parent}')
      state = _restore_step(manager, step, abstract_state, f'checkpoint {parent}/{step}')
    return state.variables(), int(step)
  from memseg_jax import convert  # pylint: disable=import-outside-toplevel
  variables = convert.restore_variables(path)
  expected = abstract_state.variables()
  check_tree_matches(leaf_shapes(expected), leaf_shapes(variables), f'checkpoint {path}')
  return variables, -1
