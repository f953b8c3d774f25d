"""Small helpers for looking at a run in a notebook (notebooks/memseg_jax_demo.ipynb).

- `read_scalars(workdir)`: the scalar curves a training run logged (loss terms, lr, memory
  momentum, eval mIoU), read back from the TensorBoard event files in the workdir.
- `memory_vectors(variables)`: MCIBI's memory (K, n, C) out of a variables dict.
- `memory_pca(memory)`: 2-D PCA projection of the class vectors (numpy SVD).
- `cosine_similarity_matrix(memory)`: class-by-class cosine similarity of the memory vectors.
- `per_class_rows(results)`: the per-class IoU / accuracy of an evaluation as table rows.
- `show_progress_logs()`: the trainer's own progress lines in the notebook, without the INFO
  chatter of the libraries it uses (orbax, tfds, clu).

Everything returns host numpy arrays or plain Python values; plotting stays in the notebook.
What does not live here: training, evaluation and inference (train.py, evaluate.py), colouring
masks (visualize.py).
"""

import collections
import glob
import logging
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

EVENT_FILE_PATTERN = 'events.out.tfevents.*'


class Series(collections.namedtuple('Series', ['steps', 'values'])):
  """One scalar curve: `steps` (N,) int64 increasing, `values` (N,) float64."""


def _event_files(workdir: str) -> List[str]:
  return sorted(glob.glob(os.path.join(workdir, '**', EVENT_FILE_PATTERN), recursive=True))


def _scalar_value(value) -> Optional[float]:
  """The float of a summary value, or None when it is not a scalar (an image, a histogram)."""
  if value.HasField('simple_value'):
    return float(value.simple_value)
  if value.HasField('tensor'):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    array = tf.make_ndarray(value.tensor)
    if array.ndim == 0 and np.issubdtype(array.dtype, np.number):
      return float(array)
  return None


def read_scalars(workdir: str, prefix: str = '') -> Dict[str, Series]:
  """Scalar summaries of the event files under `workdir`: {tag: Series(steps, values)}.

  Both TF2 tensor summaries (what clu's writers write) and TF1 `simple_value` summaries are read;
  images and other non-scalar summaries are skipped. Files in sub-folders are read too, their
  tags prefixed with the folder ('eval/...' under 'sub/' becomes 'sub/eval/...'). When a step
  was logged more than once (a run resumed from an earlier checkpoint logs the steps after it
  again), the value written last wins. Only tags starting with `prefix` are returned.

  Raises FileNotFoundError naming the folder when it holds no event file.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorflow.core.util import event_pb2  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(os.path.expanduser(workdir))
  files = _event_files(workdir)
  if not files:
    raise FileNotFoundError(f'no TensorBoard event files ({EVENT_FILE_PATTERN}) under {workdir}')
  records = collections.defaultdict(list)    # tag -> [(wall_time, order, step, value)]
  order = 0
  for path in files:
    folder = os.path.relpath(os.path.dirname(path), workdir)
    tag_prefix = '' if folder == '.' else folder.replace(os.sep, '/') + '/'
    for record in tf.data.TFRecordDataset(path):
      event = event_pb2.Event.FromString(record.numpy())
      if not event.HasField('summary'):
        continue
      for value in event.summary.value:
        tag = tag_prefix + value.tag
        if not tag.startswith(prefix):
          continue
        scalar = _scalar_value(value)
        if scalar is not None:
          records[tag].append((event.wall_time, order, int(event.step), scalar))
          order += 1
  out = {}
  for tag, items in sorted(records.items()):
    by_step = {}
    for _, _, step, scalar in sorted(items):    # by wall time: later writes replace earlier
      by_step[step] = scalar
    steps = np.array(sorted(by_step), np.int64)
    out[tag] = Series(steps, np.array([by_step[s] for s in steps], np.float64))
  return out


def memory_vectors(variables: Mapping[str, Any]) -> np.ndarray:
  """MCIBI's memory (K, n, C) float32 from {'params', 'batch_stats', 'memory': ...}.

  Raises ValueError when the variables hold no memory (a DeepLabV3 model).
  """
  import jax  # pylint: disable=import-outside-toplevel
  if 'memory' not in variables or not jax.tree_util.tree_leaves(variables['memory']):
    raise ValueError(f'the variables hold no memory (collections: {", ".join(sorted(variables))});'
                     ' only MCIBI models have one')
  leaves = jax.tree_util.tree_leaves(variables['memory'])
  if len(leaves) != 1:
    raise ValueError(f'expected one memory array in variables["memory"], found {len(leaves)}')
  memory = np.asarray(leaves[0], np.float32)
  if memory.ndim != 3:
    raise ValueError(f'expected the memory to be (K, n, C), got shape {memory.shape}')
  return memory


def _rows(memory) -> np.ndarray:
  """(K, C) or (K, n, C) -> (K * n, C) float64: one row per class (and slot)."""
  memory = np.asarray(memory, np.float64)
  if memory.ndim == 3:
    memory = memory.reshape(-1, memory.shape[-1])
  if memory.ndim != 2:
    raise ValueError(f'expected memory vectors (K, C) or (K, n, C), got shape {memory.shape}')
  return memory


def row_labels(class_names: Sequence[str], num_feats_per_cls: int = 1) -> List[str]:
  """Names of the rows of `_rows(memory)`: the class names, or 'name/slot' when n > 1."""
  if num_feats_per_cls == 1:
    return list(class_names)
  return [f'{name}/{i}' for name in class_names for i in range(num_feats_per_cls)]


def memory_pca(memory, num_components: int = 2) -> Tuple[np.ndarray, np.ndarray]:
  """PCA of the memory vectors: (coordinates (K*n, num_components), explained variance ratio).

  The rows are centred on their mean and projected onto the leading right singular vectors of
  the centred matrix (numpy SVD). Each component's sign is fixed so that its largest-magnitude
  entry of the direction is positive, which makes the picture reproducible. Components beyond
  the rank of the data are zero, with explained ratio 0 (an untrained, all-zero memory gives
  all zeros rather than NaN).
  """
  x = _rows(memory)
  centred = x - x.mean(axis=0, keepdims=True)
  _, s, vt = np.linalg.svd(centred, full_matrices=False)                 # vt (r, C)
  coords = np.zeros((x.shape[0], num_components))
  ratio = np.zeros(num_components)
  total = float(np.sum(s ** 2))
  for i in range(min(num_components, vt.shape[0])):
    if s[i] <= 1e-12 * max(s[0], 1e-300):
      break
    direction = vt[i]
    if direction[np.argmax(np.abs(direction))] < 0:
      direction = -direction
    coords[:, i] = centred @ direction
    ratio[i] = s[i] ** 2 / total
  return coords, ratio


def cosine_similarity_matrix(memory, eps: float = 1e-12) -> np.ndarray:
  """(K*n, K*n) cosine similarity between the memory rows; a zero row is 0 to every row."""
  x = _rows(memory)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  unit = np.where(norms > eps, x / np.maximum(norms, eps), 0.0)
  return np.clip(unit @ unit.T, -1.0, 1.0)


def per_class_rows(results: Mapping[str, Any]) -> List[Tuple[str, float, float]]:
  """[(class name, IoU, accuracy)] from an evaluation's results (eval_results.json).

  Classes come in the order of `results['per_class_iou']`; a missing or None value (the JSON
  form of NaN: the class occurs neither in the prediction nor the ground truth) becomes NaN.
  """
  iou = results.get('per_class_iou')
  if not isinstance(iou, Mapping):
    raise ValueError('results hold no per_class_iou dict (expected the output of '
                     'evaluate.evaluate or eval_results.json)')
  acc = results.get('per_class_acc') or {}

  def number(v):
    return math.nan if v is None else float(v)

  return [(name, number(v), number(acc.get(name))) for name, v in iou.items()]


def format_table(rows: Sequence[Tuple[str, float, float]]) -> str:
  """The rows of `per_class_rows` as a fixed-width text table (NaN shown as '-')."""
  width = max([len('class')] + [len(r[0]) for r in rows])

  def cell(v):
    return f'{v:8.4f}' if np.isfinite(v) else f'{"-":>8}'

  lines = [f'{"class":<{width}}  {"IoU":>8}  {"acc":>8}']
  lines += [f'{name:<{width}}  {cell(iou)}  {cell(acc)}' for name, iou, acc in rows]
  return '\n'.join(lines)


# ----------------------------------------------------------------------------- logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _OwnInfoFilter(logging.Filter):
  """INFO records only from this package's files; warnings and errors from everyone."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return os.path.abspath(record.pathname).startswith(_PACKAGE_DIR + os.sep)


def show_progress_logs() -> None:
  """Shows memseg_jax's INFO lines (training progress, evaluation) and only warnings of others.

  absl logging (used by memseg_jax, orbax, tfds and clu alike) is set to INFO, and a filter on
  the 'absl' logger drops the INFO records of files outside this package. Calling it again does
  not add a second filter.
  """
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.INFO)
  logger = logging.getLogger('absl')
  for f in [f for f in logger.filters if isinstance(f, _OwnInfoFilter)]:
    logger.removeFilter(f)
  logger.addFilter(_OwnInfoFilter())
