"""Tests for memseg_jax/metrics.py against independent numpy computations and hand examples."""

import math

import jax
import numpy as np
import pytest

from memseg_jax import metrics


def _numpy_scores(preds, labels, k, ignore_index=255):
  """Per-image intersection/union areas summed over images, as the reference's Evaluation."""
  inter = np.zeros(k)
  area_pred = np.zeros(k)
  area_label = np.zeros(k)
  for pred, label in zip(preds, labels):
    keep = (label != ignore_index) & (label >= 0) & (label < k)
    p, l = pred[keep], label[keep]
    for c in range(k):
      inter[c] += np.sum((p == c) & (l == c))
      area_pred[c] += np.sum(p == c)
      area_label[c] += np.sum(l == c)
  union = area_pred + area_label - inter
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = inter / union
    acc = inter / area_label
  return iou, acc, inter.sum() / area_label.sum()


def test_confusion_matrix_counts_a_hand_example():
  pred = np.array([[0, 1, 1], [2, 2, 0]])
  label = np.array([[0, 1, 2], [255, 2, 7]])   # 255 ignored, 7 >= K ignored
  conf = np.asarray(metrics.confusion_matrix(pred, label, 3))
  expected = np.zeros((3, 3), np.int64)
  expected[0, 0] = 1   # gt 0 -> pred 0
  expected[1, 1] = 1   # gt 1 -> pred 1
  expected[2, 1] = 1   # gt 2 -> pred 1
  expected[2, 2] = 1   # gt 2 -> pred 2
  np.testing.assert_array_equal(conf, expected)


def test_confusion_matrix_is_jittable_and_matches_numpy_histogram():
  rng = np.random.RandomState(0)
  k = 7
  pred = rng.randint(0, k, (2, 31, 17))
  label = rng.randint(0, k + 2, (2, 31, 17))
  label[rng.rand(*label.shape) < 0.2] = 255
  conf = jax.jit(metrics.confusion_matrix, static_argnums=(2,))(pred, label, k)
  keep = label < k
  expected, _, _ = np.histogram2d(label[keep], pred[keep], bins=k, range=[[0, k], [0, k]])
  np.testing.assert_array_equal(np.asarray(conf), expected.astype(np.int64))


def test_metrics_match_numpy_with_absent_classes_and_ignore_pixels():
  rng = np.random.RandomState(1)
  k = 9
  preds, labels = [], []
  for shape in [(23, 31), (17, 40), (8, 8)]:
    # Classes 7 and 8 never occur in prediction nor ground truth -> IoU NaN, excluded;
    # class 6 is predicted but never in the ground truth -> IoU 0, accuracy NaN.
    pred = rng.randint(0, 7, shape)
    label = rng.randint(0, 6, shape)
    label[rng.rand(*shape) < 0.15] = 255
    preds.append(pred)
    labels.append(label)
  conf = sum(np.asarray(metrics.confusion_matrix(p, l, k), np.int64)
             for p, l in zip(preds, labels))
  names = [f'class{i}' for i in range(k)]
  results = metrics.compute_metrics(conf, names, num_images=3)
  iou, acc, all_acc = _numpy_scores(preds, labels, k)
  got_iou = np.array([results['per_class_iou'][n] for n in names])
  got_acc = np.array([results['per_class_acc'][n] for n in names])
  np.testing.assert_allclose(got_iou, iou, rtol=1e-12)
  np.testing.assert_allclose(got_acc, acc, rtol=1e-12)
  assert np.isnan(got_iou[7]) and np.isnan(got_iou[8])
  assert got_iou[6] == 0.0 and np.isnan(got_acc[6])
  assert results['mIoU'] == pytest.approx(np.mean(iou[:7]), rel=1e-12)   # NaNs excluded
  assert results['mAcc'] == pytest.approx(np.mean(acc[:6]), rel=1e-12)
  assert results['aAcc'] == pytest.approx(all_acc, rel=1e-12)
  assert results['num_images'] == 3


def test_metrics_are_dataset_level_not_a_mean_over_images():
  # Image A: class 0 everywhere, predicted right (IoU 1). Image B: 1 pixel of class 0, wrong.
  conf_a = np.asarray(metrics.confusion_matrix(np.zeros((10, 10)), np.zeros((10, 10)), 2))
  conf_b = np.asarray(metrics.confusion_matrix(np.ones((1, 1)), np.zeros((1, 1)), 2))
  results = metrics.compute_metrics(conf_a + conf_b, ['a', 'b'])
  assert results['per_class_iou']['a'] == pytest.approx(100 / 101)
  assert results['per_class_iou']['b'] == 0.0
  assert results['mIoU'] == pytest.approx((100 / 101 + 0.0) / 2)


def test_all_classes_absent_gives_nan_miou():
  results = metrics.compute_metrics(np.zeros((3, 3)), ['a', 'b', 'c'])
  assert math.isnan(results['mIoU']) and math.isnan(results['aAcc'])


def test_sum_across_processes_is_identity_for_one_process():
  conf = np.arange(9, dtype=np.int64).reshape(3, 3) + (1 << 40)
  np.testing.assert_array_equal(metrics.sum_across_processes(conf), conf)


def test_int64_split_round_trips_large_counts():
  x = np.array([[0, 1, (1 << 31) - 1], [1 << 31, (1 << 45) + 12345, (1 << 61) + 7]], np.int64)
  parts = metrics.split_int64(x)
  assert parts.dtype == np.int32 and parts.shape == (2,) + x.shape
  np.testing.assert_array_equal(metrics.join_int64(parts), x)


def test_compute_metrics_rejects_wrong_class_names():
  with pytest.raises(ValueError, match='2 class names for a 3-class'):
    metrics.compute_metrics(np.zeros((3, 3)), ['a', 'b'])
