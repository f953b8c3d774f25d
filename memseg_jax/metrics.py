"""Segmentation metrics: a streaming confusion matrix and the dataset-level scores built from it.

The protocol is the reference's (SSSegmentation `Evaluation`): intersection and union are summed
over the whole dataset before any division, so every pixel of every image weighs the same.

- `confusion_matrix` is a pure, jittable function of one prediction/label pair (or a batch);
  pixels whose label is the ignore index or outside [0, K) do not count.
- `sum_across_processes` adds the per-process matrices of a multi-host evaluation exactly.
- `compute_metrics` turns the matrix into mIoU (nan-mean over classes: a class absent from both
  prediction and ground truth has IoU NaN and is left out of the mean), per-class IoU and
  accuracy (named by class), mAcc and aAcc.

What does not live here: running the network (evaluate.py) and colouring masks (visualize.py).
"""

from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(pred, label, num_classes: int, ignore_index: int = 255):
  """(K, K) int32 pixel counts, rows = ground truth class, columns = predicted class.

  Args:
    pred: int array of predicted classes in [0, K), any shape.
    label: int array of the same shape; `ignore_index` and values outside [0, K) are skipped
      (the reference maps labels >= K or < 0 to its ignore value before counting).
    num_classes: K.
    ignore_index: the ignore label (255 in this project).
  """
  pred = jnp.asarray(pred).reshape(-1).astype(jnp.int32)
  label = jnp.asarray(label).reshape(-1).astype(jnp.int32)
  k = num_classes
  valid = (label != ignore_index) & (label >= 0) & (label < k)
  # Ignored pixels go to an extra bin that is dropped, so the shape stays static under jit.
  index = jnp.where(valid, label * k + pred, k * k)
  counts = jnp.bincount(index, length=k * k + 1)[:k * k]
  return counts.reshape(k, k).astype(jnp.int32)


def split_int64(x: np.ndarray) -> np.ndarray:
  """int64 array in [0, 2**62) -> (2, ...) int32 (high, low 31 bits), for 32-bit JAX transport."""
  x = np.asarray(x, np.int64)
  return np.stack([(x >> 31).astype(np.int32), (x & ((1 << 31) - 1)).astype(np.int32)])


def join_int64(parts) -> np.ndarray:
  """Inverse of `split_int64` (over the leading axis of size 2)."""
  parts = np.asarray(parts).astype(np.int64)
  return (parts[0] << 31) + parts[1]


def sum_across_processes(conf: np.ndarray) -> np.ndarray:
  """Sums a non-negative int64 array over all JAX processes, exactly; identity for one process.

  JAX runs with 32-bit integers by default, so the counts travel as two int32 halves.
  """
  conf = np.asarray(conf, np.int64)
  if jax.process_count() == 1:
    return conf
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  gathered = np.asarray(multihost_utils.process_allgather(split_int64(conf)))   # (P, 2, ...)
  return sum(join_int64(g) for g in gathered)


def _nanmean(x: np.ndarray) -> float:
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else float('nan')


def compute_metrics(conf, class_names: Optional[Sequence[str]] = None,
                    num_images: Optional[int] = None) -> Dict[str, Any]:
  """Dataset-level scores from a (K, K) confusion matrix (rows ground truth, columns prediction).

  Returns a dict with
    mIoU: nan-mean of the per-class IoU; mAcc: nan-mean of the per-class accuracy;
    aAcc: correctly classified / all counted pixels;
    per_class_iou, per_class_acc: {class name: value}, NaN where the class never occurs
      (IoU: neither in prediction nor ground truth; accuracy: not in the ground truth);
    num_images (when given).
  """
  conf = np.asarray(conf, np.float64)
  k = conf.shape[0]
  if conf.shape != (k, k):
    raise ValueError(f'confusion matrix must be square, got shape {conf.shape}')
  if class_names is None:
    class_names = [str(i) for i in range(k)]
  if len(class_names) != k:
    raise ValueError(f'{len(class_names)} class names for a {k}-class confusion matrix')
  intersect = np.diag(conf)
  area_label = conf.sum(axis=1)
  area_pred = conf.sum(axis=0)
  union = area_label + area_pred - intersect
  with np.errstate(divide='ignore', invalid='ignore'):
    iou = intersect / union
    acc = intersect / area_label
    all_acc = intersect.sum() / area_label.sum()
  results = {
      'mIoU': _nanmean(iou),
      'mAcc': _nanmean(acc),
      'aAcc': float(all_acc),
      'per_class_iou': {name: float(v) for name, v in zip(class_names, iou)},
      'per_class_acc': {name: float(v) for name, v in zip(class_names, acc)},
  }
  if num_images is not None:
    results['num_images'] = int(num_images)
  return results
