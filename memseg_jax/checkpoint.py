"""Training checkpoints (orbax) and the initialisations that come from files.

- `create_manager(workdir, config)`: an async orbax `CheckpointManager` on
  `<workdir>/checkpoints` (absolute path), keeping the last `config.train.keep_checkpoints`.
- `check_writable(workdir)`: a workdir that cannot be written fails before anything is
  compiled (`WorkdirError`, naming it).
- `Saver(manager)`: the training run's async saves; a write that failed in the background
  surfaces as a `CheckpointWriteError` naming the step and the last complete checkpoint.
- `restore_latest(manager, abstract_state, config)`: the newest complete checkpoint onto the
  structure of the current config's TrainState, or None for a fresh workdir. The checkpoint
  carries everything a resumed run needs: params, optimizer state, BN statistics, the memory,
  the step (which is also the position in the data stream) and the base random key.
- `check_tree_matches`: a checkpoint written for another config (other depth, classes, ...)
  fails with one message naming the missing, unexpected and wrongly shaped variables and the
  config key that most likely differs, before orbax reads an array.
- `load_pretrained_backbone(config, variables)`: the ImageNet ResNet-v1c weights
  (`config.model.backbone.pretrained`: an orbax directory written by
  `python -m memseg_jax.convert --imagenet ...`, or an open-mmlab .pth converted on the fly)
  replace the backbone's params and BN statistics of freshly initialised variables.
- `abstract_variables(config)`: shapes and dtypes of the model's variables {'params',
  'batch_stats'[, 'memory']}, from `jax.eval_shape` of the model's init (nothing allocated).
- `load_eval_variables(config, workdir)` / `restore_eval_variables(path, config)`: the variables to
  evaluate or predict with, as host arrays, restored on their own (a partial orbax restore of
  those items: the optimizer state is never read, so a checkpoint of another optimizer, or
  one without optimizer state, evaluates too) from a training workdir, its checkpoints folder,
  one step folder, or a converted checkpoint (`python -m memseg_jax.convert`).

Every failure here is a `CheckpointError` (a `memseg_jax.errors.UserError`) or a
FileNotFoundError with a one-line message naming the path.

Work directories may be local or on a remote filesystem such as Cloud Storage (`gs://...`):
`absolute_path` leaves URLs as they are, orbax reads and writes them itself, and the other
file operations here go through `tf.io.gfile` (`gfile()`), which knows the same schemes.
Training checkpoints are written collectively: every process calls `save` for the same step.
"""

import collections
import os
import uuid
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from memseg_jax import errors

CHECKPOINT_SUBDIR = 'checkpoints'
# The variable collections of the model; everything else in a training checkpoint (optimizer
# state, step, random key) belongs to the trainer.
VARIABLE_COLLECTIONS = ('params', 'batch_stats', 'memory')


class CheckpointError(errors.UserError, ValueError):
  """A checkpoint that is missing something, unreadable, or not a checkpoint at all."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint whose variables do not fit the model built from the config."""


class CheckpointWriteError(errors.UserError, OSError):
  """Writing a checkpoint failed (disk full, permissions, ...); the message names the step."""


class WorkdirError(errors.UserError, OSError):
  """The work directory cannot be created or written."""


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
  return '/'.join(parts)


def leaf_shapes(tree) -> Dict[str, Tuple[int, ...]]:
  """{'params/backbone_net/stem_0/...': shape} for every array-like leaf (None leaves skipped)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape') and not isinstance(x, Mapping))
  return {_path_name(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, 'shape')}


def _rank(name: str):
  # The model's own variables first (kernels, which carry both channel counts, before the
  # rest); optimizer slots repeat the params' story.
  collection = name.split('/')[0]
  order = {'params': 0, 'memory': 1, 'batch_stats': 2}.get(collection, 3)
  return order, not name.split(' ')[0].endswith('/kernel'), name


def _listing(names, limit=12, sep=', ') -> str:
  names = sorted(names, key=_rank)
  more = f'{sep}(+{len(names) - limit} more)' if len(names) > limit else ''
  return sep.join(names[:limit]) + more


def _int_settings(config, prefix='model') -> Dict[str, int]:
  """{'model.num_classes': 150, ...}: every integer setting under config.<prefix>."""
  out = {}
  node = config.get(prefix) if hasattr(config, 'get') else None
  if node is None:
    return out
  stack = [(prefix, node)]
  while stack:
    name, node = stack.pop()
    for key in node.keys():
      value = node[key]
      if hasattr(value, 'keys'):
        stack.append((f'{name}.{key}', value))
      elif isinstance(value, int) and not isinstance(value, bool):
        out[f'{name}.{key}'] = value
  return out


# Which config key decides that a part of the model exists (for missing / unexpected keys);
# a block (model.backbone) is shown with the settings that pick its architecture.
_STRUCTURE_KEYS = (
    ('memory', 'model.name'),
    ('memory_module', 'model.name'),
    ('auxiliary_decoder', 'model.auxiliary.enabled'),
    ('backbone_net', 'model.backbone'),
    ('decoder', 'model.head.type'),
)
_ARCHITECTURE_FIELDS = ('type', 'depth')


def likely_config_key(config, expected: Mapping[str, Tuple[int, ...]],
                      found: Mapping[str, Tuple[int, ...]]) -> str:
  """'config.X most likely differs (A in the checkpoint, B in this config)', or ''.

  Missing or unexpected variables (another architecture): the setting that decides that part
  of the model exists. Only wrong shapes: the integer model setting whose value is the
  config's side of the most differing dimensions (num_classes for the classifiers and the
  memory, feats_channels for the head, ...). A guess, worded as one.
  """
  if config is None:
    return ''
  odd = set(expected) ^ set(found)
  for part, name in _STRUCTURE_KEYS:
    if any(part in key.split('/') for key in odd):
      try:
        value = config
        for k in name.split('.'):
          value = value[k]
      except (KeyError, TypeError, AttributeError):
        continue
      if hasattr(value, 'keys'):
        fields = ', '.join(f'{k}={value[k]!r}' for k in _ARCHITECTURE_FIELDS if k in value)
        return f'config.{name} most likely differs ({fields} in this config)'
      return f'config.{name} most likely differs (it is {value!r} in this config)'
  settings = _int_settings(config)
  votes = collections.Counter()
  theirs = collections.defaultdict(set)
  for key in set(expected) & set(found):
    e, f = tuple(expected[key]), tuple(found[key])
    if e == f or len(e) != len(f):
      continue
    for de, df in zip(e, f):
      if de != df:
        for name, value in settings.items():
          if value == de:
            votes[name] += 1
            theirs[name].add(df)
  if not votes:
    return ''
  name, _ = votes.most_common(1)[0]
  in_ckpt = ' or '.join(str(v) for v in sorted(theirs[name]))
  return (f'config.{name} most likely differs ({in_ckpt} in the checkpoint, {settings[name]} '
          'in this config)')


def check_tree_matches(expected: Mapping[str, Tuple[int, ...]],
                       found: Mapping[str, Tuple[int, ...]], what: str, config=None) -> None:
  """Raises CheckpointMismatchError naming every missing, unexpected and mis-shaped variable.

  With `config`, the message starts with the config key that most likely differs.
  """
  missing = set(expected) - set(found)
  unexpected = set(found) - set(expected)
  shapes = [f'{k} {tuple(found[k])} in the checkpoint vs {tuple(expected[k])} in the model'
            for k in set(expected) & set(found) if tuple(found[k]) != tuple(expected[k])]
  if not (missing or unexpected or shapes):
    return
  problems = []
  if shapes:
    problems.append(f'wrong shapes: {_listing(shapes, 4, sep="; ")}')
  if missing:
    problems.append(f'missing: {_listing(missing, 6)}')
  if unexpected:
    problems.append(f'unexpected: {_listing(unexpected, 6)}')
  hint = likely_config_key(config, expected, found)
  raise CheckpointMismatchError(
      f'{what} does not fit the model of this config{": " + hint if hint else ""}. '
      + '. '.join(p[0].upper() + p[1:] for p in problems))


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
def check_writable(workdir: str, what: str = 'workdir') -> str:
  """Creates `workdir` if needed and writes (then removes) a file in it; returns its absolute path.

  Raises WorkdirError naming the folder (as `what`) when it cannot be written (read-only, no
  permission, a file in the way, disk full), so a run fails before anything is compiled.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  workdir = absolute_path(workdir)
  probe = os.path.join(workdir, f'.memseg_write_test_{uuid.uuid4().hex}')
  try:
    gfile().makedirs(workdir)
    with gfile().GFile(probe, 'w') as f:
      f.write('memseg_jax')
    gfile().remove(probe)
  except (OSError, tf.errors.OpError) as e:
    reason = getattr(e, 'message', None) or getattr(e, 'strerror', None) or str(e)
    raise WorkdirError(f'{what} {workdir} cannot be written ({errors.one_line(reason)})') from None
  return workdir


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


class Saver:
  """The async checkpoint saves of a training run, and what to tell when a write fails.

  orbax writes in the background and reports a failed write (disk full, permissions, a
  vanished bucket) at the next save, check or wait; `Saver` turns it into a
  CheckpointWriteError naming the step whose write failed and the last complete checkpoint,
  from which the next start resumes (an incomplete write is never restored: orbax only
  lists a step once its write has been committed).
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self.manager = manager
    self.last_complete = manager.latest_step()
    self.in_flight: Optional[int] = None

  def _failed(self, step: int, error: Exception) -> CheckpointWriteError:
    kept = (f'the last complete checkpoint is step {self.last_complete} (the next start '
            'resumes from it)' if self.last_complete is not None
            else 'no complete checkpoint was written')
    return CheckpointWriteError(
        f'writing checkpoint {step} to {self.manager.directory} failed '
        f'({type(error).__name__}: {errors.describe(error)}); training stopped, {kept}')

  def save(self, step: int, state) -> None:
    """Waits for the previous write (orbax would anyway), then starts writing `step`."""
    self.wait()
    try:
      save(self.manager, step, state)
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(int(step), e) from None
    self.in_flight = int(step)

  def poll(self) -> None:
    """Cheap, after every step: a write that already failed stops the run now."""
    if self.in_flight is not None:
      try:
        self.manager.check_for_errors()
      except Exception as e:  # pylint: disable=broad-except
        raise self._failed(self.in_flight, e) from None

  def wait(self) -> None:
    """Waits for the write in flight; CheckpointWriteError if it failed."""
    if self.in_flight is None:
      return
    step, self.in_flight = self.in_flight, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(step, e) from None
    self.last_complete = step

  def close(self) -> None:
    """Stops orbax's threads; on an error path the write in flight is abandoned quietly."""
    try:
      self.manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass             # already reported (or the run is failing for another reason)
    self.manager.close()


def read_tree_metadata(item_dir: str, what: str) -> Mapping[str, Any]:
  """The stored tree of an orbax PyTree checkpoint (array metadata: shapes, dtypes), no data."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  if not gfile().exists(os.path.join(item_dir, '_METADATA')):
    raise CheckpointError(f'{item_dir} is not a checkpoint (no orbax _METADATA file; expected a '
                          'training workdir, its checkpoints folder, one step folder or a '
                          'converted checkpoint)')
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(epath.Path(item_dir))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'{what} cannot be read as an orbax checkpoint '
                          f'({type(e).__name__}: {errors.describe(e)})') from None
  finally:
    handler.close()
  tree = getattr(metadata, 'tree', metadata)
  if not isinstance(tree, Mapping):
    raise CheckpointError(f'{what} holds no variables (an empty or foreign orbax checkpoint)')
  return tree


def restore_latest(manager: ocp.CheckpointManager, abstract_state, config=None) -> Optional[Any]:
  """The latest checkpoint restored onto `abstract_state` (shapes/dtypes/shardings), or None.

  The stored shapes are compared with `abstract_state` first: a checkpoint of another config
  is a CheckpointMismatchError naming the variables (and, with `config`, the likely key).
  """
  step = manager.latest_step()
  if step is None:
    return None
  step_dir = os.path.join(str(manager.directory), str(step))
  what = f'checkpoint {step_dir}'
  tree = read_tree_metadata(os.path.join(step_dir, 'default'), what)
  check_tree_matches(leaf_shapes(abstract_state), leaf_shapes(tree), what, config)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


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
def abstract_variables(config, image_size=None) -> Dict[str, Any]:
  """ShapeDtypeStructs of the model's variables {'params', 'batch_stats'[, 'memory']}.

  From `jax.eval_shape` of the model's init: nothing is allocated or compiled, and
  config.model.backbone.pretrained is not read (it does not change a shape).
  """
  import flax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from memseg_jax.models import build_model  # pylint: disable=import-outside-toplevel
  model = build_model(config)
  h, w = image_size or tuple(config.data.crop_size)
  key = jax.random.PRNGKey(0)
  shapes = jax.eval_shape(lambda: model.init({'params': key, 'dropout': key},
                                             jnp.zeros((1, h, w, 3), jnp.float32), train=False))
  return {k: v for k, v in flax.core.unfreeze(shapes).items() if v}


def _is_manager_dir(path: str) -> bool:
  # Step folders, complete ('12') or cut short ('12.orbax-checkpoint-tmp-...').
  return gfile().isdir(path) and any(name.rstrip('/').split('.')[0].isdigit()
                                     for name in gfile().listdir(path))


def _latest_complete_step(path: str) -> Optional[int]:
  # Only finalized steps: a write cut short (a killed run) is never picked up.
  steps = ocp.utils.checkpoint_steps(path)
  return max(steps) if steps else None


def locate_variables(path: str) -> Tuple[str, Optional[int], str]:
  """(folder of the stored tree, training step or None, description) of a checkpoint path.

  `path`: a training workdir, its checkpoints folder (the latest complete step is used), one
  step folder, or a converted checkpoint.
  """
  path = absolute_path(path)
  if not gfile().exists(path):
    raise FileNotFoundError(f'no checkpoint at {path} (train first, or set '
                            '--config.eval.checkpoint=DIR)')
  if os.path.basename(path) != CHECKPOINT_SUBDIR and \
      gfile().isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
    path = os.path.join(path, CHECKPOINT_SUBDIR)
  if _is_manager_dir(path):
    step = _latest_complete_step(path)
    if step is None:
      raise CheckpointError(f'no complete checkpoint in {path} (only writes cut short)')
    step_dir = os.path.join(path, str(step))
    return os.path.join(step_dir, 'default'), int(step), f'checkpoint {step_dir}'
  if gfile().isdir(os.path.join(path, 'default')) and os.path.basename(path).isdigit():
    return os.path.join(path, 'default'), int(os.path.basename(path)), f'checkpoint {path}'
  if not gfile().isdir(path):
    raise CheckpointError(f'{path} is a file, not a checkpoint folder (a training workdir, its '
                          'checkpoints folder, one step folder or a converted checkpoint; '
                          'convert a PyTorch .pth with python -m memseg_jax.convert)')
  return path, None, f'checkpoint {path}'


def restore_eval_variables(path: str, config) -> Tuple[Dict[str, Any], Optional[int]]:
  """(variables as host numpy arrays, training step or None) from a checkpoint path.

  Only params / batch_stats / memory are read (a partial restore): the optimizer state, the
  step and the random key of a training checkpoint are never touched, whatever their kind.
  The stored shapes are checked against the model of `config` before any array is read.
  """
  item_dir, step, what = locate_variables(path)
  tree = read_tree_metadata(item_dir, what)
  expected = abstract_variables(config)
  stored = {k: tree[k] for k in VARIABLE_COLLECTIONS if isinstance(tree.get(k), Mapping)
            and tree[k]}
  if not stored:
    raise CheckpointError(f'{what} holds none of {", ".join(VARIABLE_COLLECTIONS)} (found: '
                          f'{", ".join(sorted(tree)) or "nothing"})')
  check_tree_matches(leaf_shapes(expected), leaf_shapes(stored), what, config)
  from etils import epath  # pylint: disable=import-outside-toplevel
  restore_args = jax.tree_util.tree_map(
      lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), expected)
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  try:
    variables = checkpointer.restore(epath.Path(item_dir), args=ocp.args.PyTreeRestore(
        item=expected, restore_args=restore_args, partial_restore=True))
  finally:
    checkpointer.close()
  return {k: dict(variables[k]) for k in expected}, step


def load_eval_variables(config, workdir: str) -> Tuple[Dict[str, Any], Optional[int]]:
  """(variables, step) of config.eval.checkpoint, else of the workdir's latest checkpoint.

  See `restore_eval_variables`; step is None for a converted checkpoint.
  """
  return restore_eval_variables(config.eval.checkpoint or checkpoint_dir(workdir), config)
