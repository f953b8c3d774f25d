"""Notebook helpers: scalars read back from event files equal what was written, and the memory
PCA / cosine similarity agree with independent numpy computations."""

import math
import os
import time

import numpy as np
import pytest

from memseg_jax import notebook_utils


# ----------------------------------------------------------------------------- read_scalars

def _write_with_clu(logdir, scalars_by_step, images=False):
  """What training writes: clu's SummaryWriter (TF2 tensor summaries)."""
  from clu import metric_writers
  writer = metric_writers.SummaryWriter(str(logdir))
  for step, scalars in scalars_by_step:
    writer.write_scalars(step, scalars)
    if images:
      writer.write_images(step, {'eval/image0_gt_pred': np.zeros((1, 4, 6, 3), np.uint8)})
  writer.flush()
  writer.close()


def _write_simple_values(path, items):
  """TF1-style events with `simple_value` summaries, written as raw TFRecords."""
  import tensorflow as tf
  from tensorflow.core.framework import summary_pb2
  from tensorflow.core.util import event_pb2
  with tf.io.TFRecordWriter(str(path)) as f:
    for step, tag, value in items:
      summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag,
                                                                     simple_value=value)])
      f.write(event_pb2.Event(wall_time=time.time(), step=step,
                              summary=summary).SerializeToString())


def test_read_scalars_returns_every_logged_scalar_by_step_and_skips_images(tmp_path):
  losses = {10: 2.5, 20: 1.75, 30: 1.25}
  lrs = {10: 0.05, 20: 0.04, 30: 0.03}
  _write_with_clu(tmp_path, [(s, {'train/loss_total': losses[s], 'train/lr': lrs[s]})
                             for s in sorted(losses)], images=True)
  scalars = notebook_utils.read_scalars(str(tmp_path))
  assert sorted(scalars) == ['train/loss_total', 'train/lr']    # no image tag
  np.testing.assert_array_equal(scalars['train/loss_total'].steps, [10, 20, 30])
  np.testing.assert_allclose(scalars['train/loss_total'].values, [2.5, 1.75, 1.25], rtol=1e-7)
  np.testing.assert_allclose(scalars['train/lr'].values, [0.05, 0.04, 0.03], rtol=1e-6)
  assert list(notebook_utils.read_scalars(str(tmp_path), prefix='train/lr')) == ['train/lr']


def test_a_resumed_run_s_later_values_replace_the_earlier_ones_of_the_same_step(tmp_path):
  # First run logged 10, 20, 30 and was stopped; the resumed run starts after the step-20
  # checkpoint and logs 30 and 40 again, later in time and in another event file.
  _write_with_clu(tmp_path, [(10, {'train/loss_total': 3.0}), (20, {'train/loss_total': 2.0}),
                             (30, {'train/loss_total': 1.9})])
  time.sleep(1.1)   # event files are named by the second they are opened
  _write_with_clu(tmp_path, [(30, {'train/loss_total': 1.5}), (40, {'train/loss_total': 1.0})])
  assert len([n for n in os.listdir(tmp_path) if n.startswith('events.out.tfevents.')]) == 2
  series = notebook_utils.read_scalars(str(tmp_path))['train/loss_total']
  np.testing.assert_array_equal(series.steps, [10, 20, 30, 40])
  np.testing.assert_allclose(series.values, [3.0, 2.0, 1.5, 1.0])


def test_read_scalars_reads_tf1_simple_values_and_prefixes_sub_folders(tmp_path):
  os.makedirs(tmp_path / 'eval')
  _write_simple_values(tmp_path / 'eval' / 'events.out.tfevents.1.host',
                       [(5, 'mIoU', 0.25), (1, 'mIoU', 0.125)])
  scalars = notebook_utils.read_scalars(str(tmp_path))
  assert list(scalars) == ['eval/mIoU']
  np.testing.assert_array_equal(scalars['eval/mIoU'].steps, [1, 5])     # sorted by step
  np.testing.assert_allclose(scalars['eval/mIoU'].values, [0.125, 0.25])


def test_read_scalars_of_a_folder_without_event_files_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'empty')):
    notebook_utils.read_scalars(str(tmp_path / 'empty'))


# ----------------------------------------------------------------------------- the memory

def test_memory_pca_matches_the_eigenvectors_of_the_covariance():
  rng = np.random.default_rng(0)
  memory = rng.normal(size=(8, 1, 16)) @ np.diag(np.linspace(3, 0.1, 16))   # (K, n, C)
  coords, ratio = notebook_utils.memory_pca(memory)
  x = memory.reshape(8, 16)
  centred = x - x.mean(0)
  eigvals, eigvecs = np.linalg.eigh(centred.T @ centred)     # ascending
  top = eigvecs[:, ::-1][:, :2]
  expected = centred @ top
  for i in range(2):   # the same axes up to sign; the sign is fixed by the largest entry
    sign = np.sign(top[np.argmax(np.abs(top[:, i])), i])
    np.testing.assert_allclose(coords[:, i], sign * expected[:, i], atol=1e-10)
  np.testing.assert_allclose(ratio, eigvals[::-1][:2] / eigvals.sum(), rtol=1e-10)
  # Projections onto orthogonal axes are uncorrelated, the first carries the most variance.
  assert abs(np.dot(coords[:, 0], coords[:, 1])) < 1e-8
  assert coords[:, 0].var() >= coords[:, 1].var()


def test_memory_pca_of_a_hand_worked_example():
  # Four points on a line along x plus a small y offset for one: PC1 is x, PC2 is y.
  memory = np.array([[-3., 0., 0.], [-1., 0., 0.], [1., 0., 0.], [3., 1., 0.]])
  coords, ratio = notebook_utils.memory_pca(memory)
  # Centred: mean (0, 0.25, 0). The x spread (20) dominates the y spread (0.75).
  assert coords.shape == (4, 2)
  assert ratio[0] > 0.95 and ratio[0] + ratio[1] == pytest.approx(1.0)
  assert np.argsort(coords[:, 0]).tolist() == [0, 1, 2, 3]   # order along x is kept (sign fix)


def test_memory_pca_of_an_untrained_all_zero_memory_is_zero_not_nan():
  coords, ratio = notebook_utils.memory_pca(np.zeros((8, 1, 4), np.float32))
  np.testing.assert_array_equal(coords, np.zeros((8, 2)))
  np.testing.assert_array_equal(ratio, [0.0, 0.0])


def test_cosine_similarity_matrix_against_the_formula():
  rng = np.random.default_rng(1)
  memory = rng.normal(size=(5, 2, 7)).astype(np.float32)    # n = 2 slots per class
  sim = notebook_utils.cosine_similarity_matrix(memory)
  rows = memory.reshape(10, 7).astype(np.float64)
  assert sim.shape == (10, 10)
  for i in range(10):
    for j in range(10):
      expected = rows[i] @ rows[j] / (np.linalg.norm(rows[i]) * np.linalg.norm(rows[j]))
      assert sim[i, j] == pytest.approx(expected, abs=1e-12)
  np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-12)
  np.testing.assert_allclose(sim, sim.T)


def test_cosine_similarity_hand_example_and_zero_rows():
  memory = np.array([[1., 0.], [1., 1.], [-2., 0.], [0., 0.]])
  sim = notebook_utils.cosine_similarity_matrix(memory)
  assert sim[0, 1] == pytest.approx(1 / math.sqrt(2))
  assert sim[0, 2] == pytest.approx(-1.0)
  np.testing.assert_array_equal(sim[3], np.zeros(4))     # a class never seen: no similarity
  np.testing.assert_array_equal(sim[:, 3], np.zeros(4))


def test_memory_vectors_come_out_of_the_variables_and_deeplab_has_none():
  memory = np.arange(24, dtype=np.float32).reshape(4, 1, 6)
  variables = {'params': {'w': np.ones(2)}, 'batch_stats': {},
               'memory': {'memory_module': {'memory': memory}}}
  np.testing.assert_array_equal(notebook_utils.memory_vectors(variables), memory)
  with pytest.raises(ValueError, match='no memory'):
    notebook_utils.memory_vectors({'params': {'w': np.ones(2)}, 'batch_stats': {}})
  assert notebook_utils.row_labels(['a', 'b'], 2) == ['a/0', 'a/1', 'b/0', 'b/1']
  assert notebook_utils.row_labels(['a', 'b']) == ['a', 'b']


# ----------------------------------------------------------------------------- tables

def test_per_class_rows_keep_the_class_order_and_turn_json_nulls_into_nan():
  results = {'mIoU': 0.5, 'per_class_iou': {'sky': 0.75, 'wall': None, 'grass': 0.25},
             'per_class_acc': {'sky': 0.875, 'wall': None, 'grass': 0.5}}
  rows = notebook_utils.per_class_rows(results)
  assert [r[0] for r in rows] == ['sky', 'wall', 'grass']
  assert rows[0][1:] == (0.75, 0.875) and rows[2][1:] == (0.25, 0.5)
  assert math.isnan(rows[1][1]) and math.isnan(rows[1][2])
  table = notebook_utils.format_table(rows).splitlines()
  assert table[1].split() == ['sky', '0.7500', '0.8750']
  assert table[2].split() == ['wall', '-', '-']
  with pytest.raises(ValueError, match='per_class_iou'):
    notebook_utils.per_class_rows({'mIoU': 0.5})


# ----------------------------------------------------------------------------- logging

def _absl_record(level, path):
  import logging
  return logging.LogRecord('absl', level, path, 1, 'message', None, None)


def test_progress_logs_keep_this_package_s_info_lines_and_everyone_s_warnings():
  import logging
  package = os.path.dirname(os.path.abspath(notebook_utils.__file__))
  other = '/site-packages/orbax/checkpoint/checkpoint_manager.py'
  from absl import logging as absl_logging
  logger = logging.getLogger('absl')
  before = list(logger.filters)
  verbosity = absl_logging.get_verbosity()
  try:
    notebook_utils.show_progress_logs()
    notebook_utils.show_progress_logs()      # idempotent
    added = [f for f in logger.filters if f not in before]
    assert len(added) == 1
    keep = added[0].filter
    assert keep(_absl_record(logging.INFO, os.path.join(package, 'train.py')))
    assert not keep(_absl_record(logging.INFO, other))
    assert keep(_absl_record(logging.WARNING, other))
    # A sibling folder whose name merely starts like the package's is not the package.
    assert not keep(_absl_record(logging.INFO, package + '_extra/x.py'))
  finally:
    absl_logging.set_verbosity(verbosity)
    for f in list(logger.filters):
      if f not in before:
        logger.removeFilter(f)
