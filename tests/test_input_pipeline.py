"""Train/eval pipelines on a tiny synthetic_scenes build: shapes, determinism, resumption,
every eval image exactly once across processes, counts."""

import math

import cv2
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import default
from memseg_jax import datasets
from memseg_jax import input_pipeline as ip
from memseg_jax.datasets import synthetic_scenes

NUM_TRAIN, NUM_VAL = 10, 7


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('tfds')
  synthetic_scenes.register_config(synthetic_scenes.SyntheticScenesConfig(
      name='pipe', num_train=NUM_TRAIN, num_validation=NUM_VAL))
  datasets.download_and_prepare(datasets.get_builder('synthetic_scenes/pipe', str(d)))
  return str(d)


def make_config(data_dir, **train):
  c = default.get_config()
  c.data.name = 'synthetic_scenes/pipe'
  c.data.data_dir = data_dir
  c.data.crop_size = (48, 64)
  c.data.train_scale = (256, 96)
  c.data.eval_scale = (256, 96)
  c.data.shuffle_buffer = 6
  c.data.num_parallel_calls = 2
  c.train.batch_size = 4
  c.train.update(train)
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def test_train_batches_have_the_documented_format(data_dir):
  c = make_config(data_dir)
  batches = take(ip.create_train_dataset(c), 3)
  for b in batches:
    assert set(b) == {'image', 'label'}
    assert b['image'].shape == (4, 48, 64, 3) and b['image'].dtype == np.float32
    assert b['label'].shape == (4, 48, 64) and b['label'].dtype == np.int32
    values = set(np.unique(b['label']).tolist())
    assert values <= set(range(synthetic_scenes.NUM_CLASSES)) | {255}
    # Normalised: pixel values of [0, 255] map into [-mean/std, (255-mean)/std].
    lo = -np.array(c.data.mean) / np.array(c.data.std)
    hi = (255 - np.array(c.data.mean)) / np.array(c.data.std)
    assert np.all(b['image'] >= lo.min() - 1e-4) and np.all(b['image'] <= hi.max() + 1e-4)


def test_train_stream_is_deterministic_and_depends_on_the_seed(data_dir):
  c = make_config(data_dir)
  a = take(ip.create_train_dataset(c), 3)
  b = take(ip.create_train_dataset(c), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  c.seed = 1
  other = take(ip.create_train_dataset(c), 1)[0]
  assert not np.array_equal(other['image'], a[0]['image'])


@pytest.mark.parametrize('process_count', [1, 2])
def test_resumed_stream_equals_the_uninterrupted_one(data_dir, process_count):
  c = make_config(data_dir)
  b_host = 4 // process_count
  n_p = len(range(0, NUM_TRAIN, process_count))
  full = take(ip.create_train_dataset(c, process_index=process_count - 1,
                                      process_count=process_count), 6)
  # Step 3 starts mid-epoch 1, step 5 exactly at the start of epoch 2 (n_p = 5 * b_host).
  assert 5 * b_host == 2 * n_p
  for step in (3, 5):
    resumed = next(ip.create_train_dataset(c, process_index=process_count - 1,
                                           process_count=process_count, start_step=step))
    np.testing.assert_array_equal(resumed['image'], full[step]['image'])
    np.testing.assert_array_equal(resumed['label'], full[step]['label'])
  assert full[0]['image'].shape[0] == b_host


def _names(records):
  spec = {'file_name': tf.io.FixedLenFeature([], tf.string)}
  return [(int(e), int(j), tf.io.parse_single_example(x, spec)['file_name'].numpy())
          for e, j, x in records]


@pytest.mark.parametrize('process_count', [1, 3])
def test_each_epoch_is_a_permutation_of_the_process_share(data_dir, process_count):
  c = make_config(data_dir, batch_size=process_count)
  shares = []
  for p in range(process_count):
    n_p = len(range(p, NUM_TRAIN, process_count))
    recs = _names(ip.train_records(c, process_index=p, process_count=process_count)
                  .take(3 * n_p))
    epochs = [[name for e, _, name in recs if e == k] for k in range(3)]
    assert [len(x) for x in epochs] == [n_p] * 3
    assert all(sorted(x) == sorted(epochs[0]) and len(set(x)) == n_p for x in epochs)
    assert [j for e, j, _ in recs if e == 1] == list(range(n_p))
    if n_p > 5:
      assert epochs[0] != epochs[1], 'each epoch is reshuffled'
    shares.append(set(epochs[0]))
  assert set.union(*shares) == {f'train/{i:06d}.jpg'.encode() for i in range(NUM_TRAIN)}
  assert sum(len(s) for s in shares) == NUM_TRAIN


def test_eval_yields_every_image_exactly_once_across_processes(data_dir):
  c = make_config(data_dir)
  builder = datasets.get_builder('synthetic_scenes/pipe', data_dir)
  stored = {ex['file_name']: ex for ex in tfds.as_numpy(builder.as_dataset(split='validation'))}
  for process_count, batch in ((1, 3), (2, 4), (3, 3)):
    per_process = [list(ip.create_eval_dataset(c, process_index=p, process_count=process_count,
                                               batch_size=batch))
                   for p in range(process_count)]
    shapes = [[(b['image'].shape, b['label'].shape) for b in batches]
              for batches in per_process]
    assert all(s == shapes[0] for s in shapes), 'processes must see the same shapes per step'
    names = []
    for batches in per_process:
      for b in batches:
        b_host = max(1, batch // process_count)
        assert b['image'].shape[0] == b_host and b['valid'].shape == (b_host,)
        assert b['image'].shape[1] % 64 == 0 and b['label'].shape[1] % 64 == 0
        for k in range(b_host):
          if not b['valid'][k]:
            assert np.all(b['label'][k] == 255) and np.all(b['image'][k] == 0)
            continue
          names.append(b['file_name'][k])
          ex = stored[b['file_name'][k]]
          h, w = ex['label'].shape[:2]
          assert tuple(b['orig_hw'][k]) == (h, w)
          np.testing.assert_array_equal(b['label'][k][:h, :w], ex['label'][..., 0])
          assert np.all(b['label'][k][h:] == 255) and np.all(b['label'][k][:, w:] == 255)
          rh, rw = b['image_hw'][k]
          f = min(256 / max(h, w), 96 / min(h, w))
          assert (rh, rw) == (int(h * f + 0.5), int(w * f + 0.5))
          want = cv2.resize(ex['image'], (int(rw), int(rh)), interpolation=cv2.INTER_LINEAR)
          want = (want - np.array(c.data.mean)) / np.array(c.data.std)
          # The OpenCV backend (default here) resizes exactly like the reference.
          assert np.abs(b["image"][k][:rh, :rw] - want).max() < 1e-4
          assert np.all(b['image'][k][rh:] == 0) and np.all(b['image'][k][:, rw:] == 0)
    assert sorted(names) == sorted(stored)


def test_jpeg_region_decoding_equals_decode_then_crop(data_dir):
  builder = datasets.get_builder('synthetic_scenes/pipe', data_dir)
  ds = builder.as_dataset(split='train', decoders={'image': tfds.decode.SkipDecoding()})
  for ex in ds.take(2):
    full = tf.io.decode_jpeg(ex['image'], channels=3).numpy()
    region_fn = ip._image_region_fn(ex['image'])  # pylint: disable=protected-access
    region = region_fn(3, 5, 20, 30).numpy()
    np.testing.assert_array_equal(region, full[3:23, 5:35])


def test_counts_follow_the_reference_formula(data_dir, tmp_path):
  c = make_config(data_dir, batch_size=16)
  assert ip.get_num_train_examples(c) == NUM_TRAIN
  assert ip.iterations_per_epoch(c, 8) == math.ceil(NUM_TRAIN / 8) // 2
  c.data.name = 'ade20k'
  c.data.data_dir = str(tmp_path)        # not prepared: falls back to the configured size
  assert ip.get_num_train_examples(c) == 20210
  assert ip.iterations_per_epoch(c, 8) == 1263    # spec section 5


def test_missing_dataset_is_a_clear_error(tmp_path):
  c = make_config(str(tmp_path))
  c.data.name = 'cityscapes'
  with pytest.raises(datasets.DatasetNotPreparedError,
                     match='prepare_datasets.py --dataset=cityscapes'):
    ip.create_train_dataset(c)


def test_file_level_sharding_is_disjoint_and_resumable(data_dir, monkeypatch):
  """With at least as many files as processes, each process reads whole files."""
  real = ip._split_files  # pylint: disable=protected-access

  def four_shards(builder, name, split):
    files = real(builder, name, split)
    # The same file under four names stands for a four-shard split.
    return ip._SplitFiles(files.paths * 4, files.lengths * 4)  # pylint: disable=protected-access

  monkeypatch.setattr(ip, '_split_files', four_shards)
  c = make_config(data_dir, batch_size=2)
  for p in range(2):
    stream = _names(ip.train_records(c, process_index=p, process_count=2).take(45))
    # Two of the four shards: 2 * NUM_TRAIN records per epoch, each name twice.
    epoch0 = [n for e, _, n in stream if e == 0]
    assert len(epoch0) == 2 * NUM_TRAIN
    assert sorted(epoch0) == sorted([f'train/{i:06d}.jpg'.encode() for i in range(NUM_TRAIN)] * 2)
    for step in (7, 20):
      resumed = _names(ip.train_records(c, process_index=p, process_count=2, start_step=step)
                       .take(5))
      assert resumed == stream[step:step + 5]
