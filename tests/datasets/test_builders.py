"""Every builder prepared from a tiny download in its official layout; remaps checked per value."""

import os

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from memseg_jax import datasets
from memseg_jax.datasets import synthetic_scenes
from tests.datasets import layouts

# Expected raw -> train id maps, written from the spec (section 6), not from the builders.
_CITYSCAPES = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
               24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _expected(name, raw):
  raw = raw.astype(np.int64)
  if name in ('ade20k', 'cocostuff10k'):
    out = np.where((raw == 0) | (raw == 255), 255, raw - 1)
  elif name == 'cityscapes':
    out = np.vectorize(lambda v: _CITYSCAPES.get(int(v), 255))(raw)
  else:
    out = raw
  return out.astype(np.uint8)


def _prepare(name, manual_dir, data_dir, **kwargs):
  builder = datasets.get_builder(name, str(data_dir), **kwargs)
  datasets.download_and_prepare(builder, str(manual_dir))
  return builder


def _check_split(builder, name, split, raws):
  examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
  assert len(examples) == len(raws)
  seen = set()
  for ex in examples:
    stem = os.path.basename(ex['file_name'].decode())
    for suffix in ('_leftImg8bit.png', '.jpg', '.png'):
      stem = stem[:-len(suffix)] if stem.endswith(suffix) else stem
    raw = raws[stem]
    seen.add(stem)
    assert ex['label'].shape == raw.shape + (1,)
    np.testing.assert_array_equal(ex['label'][..., 0], _expected(name, raw))
    assert ex['image'].shape == raw.shape + (3,)
    assert (int(ex['height']), int(ex['width'])) == raw.shape
  assert seen == set(raws)


@pytest.mark.parametrize('name,writer,splits', [
    ('ade20k', layouts.ade20k, {'train': 'train', 'validation': 'validation'}),
    ('cityscapes', layouts.cityscapes, {'train': 'train', 'validation': 'validation'}),
    ('lip', layouts.lip, {'train': 'train', 'validation': 'validation'}),
    ('cocostuff10k', layouts.cocostuff10k, {'train': 'train', 'test': 'test'}),
])
def test_builder_remaps_every_label_value(tmp_path, name, writer, splits):
  raws = writer(str(tmp_path / 'download'))
  builder = _prepare(name, tmp_path / 'download', tmp_path / 'data')
  for split, key in splits.items():
    _check_split(builder, name, split, raws[key])
  # Every raw value the dataset allows appears in the written labels (so all were checked).
  meta = datasets.get_dataset_info(name)
  assert meta.num_classes == len(meta.class_names) == len(meta.palette)


def test_ade20k_reads_the_zip_like_the_folder(tmp_path):
  raws = layouts.ade20k(str(tmp_path / 'extracted'))
  os.makedirs(tmp_path / 'zipped')
  layouts.zip_folder(str(tmp_path / 'extracted' / 'ADEChallengeData2016'),
                     str(tmp_path / 'zipped' / 'ADEChallengeData2016.zip'))
  builder = _prepare('ade20k', tmp_path / 'zipped', tmp_path / 'data')
  _check_split(builder, 'ade20k', 'train', raws['train'])
  _check_split(builder, 'ade20k', 'validation', raws['validation'])


def _ade_error(tmp_path, match, **kwargs):
  with pytest.raises(datasets.PreparationError, match=match):
    _prepare('ade20k', tmp_path / 'download', tmp_path / 'data', **kwargs)


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
  layouts.ade20k(str(tmp_path / 'download'), n_train=3)
  bad = tmp_path / 'download/ADEChallengeData2016/images/training/ADE_training_00000001.jpg'
  bad.write_bytes(b'not a jpeg at all')
  _ade_error(tmp_path, 'ADE_training_00000001.jpg')
  builder = _prepare('ade20k', tmp_path / 'download', tmp_path / 'data2', skip_corrupt=True)
  assert builder.info.splits['train'].num_examples == 2
  assert len(builder.skipped_files) == 1 and 'ADE_training_00000001.jpg' in builder.skipped_files[0]


def test_label_size_mismatch_is_named(tmp_path):
  layouts.ade20k(str(tmp_path / 'download'))
  path = (tmp_path /
          'download/ADEChallengeData2016/annotations/validation/ADE_validation_00000000.png')
  cv2.imwrite(str(path), np.ones((5, 5), np.uint8))
  _ade_error(tmp_path, r'ADE_validation_00000000\.png has size \(5, 5\)')


def test_out_of_range_label_value_is_named(tmp_path):
  layouts.ade20k(str(tmp_path / 'download'))
  path = tmp_path / 'download/ADEChallengeData2016/annotations/training/ADE_training_00000000.png'
  lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
  lab[3, 3] = 151
  cv2.imwrite(str(path), lab)
  _ade_error(tmp_path, r'ADE_training_00000000\.png has values outside.*\[151\]')


def test_missing_and_empty_split_folders_are_named(tmp_path):
  layouts.ade20k(str(tmp_path / 'download'))
  folder = tmp_path / 'download/ADEChallengeData2016/images/validation'
  for f in folder.iterdir():
    f.unlink()
  _ade_error(tmp_path, r'images/validation holds no')
  folder.rmdir()
  _ade_error(tmp_path, r'missing folder for ADE20K validation images')


def test_not_prepared_error_names_data_dir_and_command(tmp_path):
  with pytest.raises(datasets.DatasetNotPreparedError) as e:
    datasets.require_prepared('lip', str(tmp_path))
  msg = str(e.value)
  assert str(tmp_path) in msg
  assert f'python scripts/prepare_datasets.py --dataset=lip --manual_dir=' in msg
  assert f'--data_dir={tmp_path}' in msg


def test_synthetic_scenes_is_deterministic_and_labelled(tmp_path):
  cfg = synthetic_scenes.SyntheticScenesConfig(name='t', num_train=4, num_validation=2)
  builder = datasets.get_builder('synthetic_scenes', str(tmp_path), config=cfg)
  datasets.download_and_prepare(builder)
  exs = {e['file_name']: e for e in tfds.as_numpy(builder.as_dataset(split='train'))}
  assert len(exs) == 4
  for i in range(4):
    image, label = synthetic_scenes.generate_example(0, 'train', i, cfg)
    ex = exs[f'train/{i:06d}.jpg'.encode()]
    np.testing.assert_array_equal(ex['label'][..., 0], label)
    # JPEG is lossy: compare loosely with the generated pixels.
    assert np.abs(ex['image'].astype(int) - image.astype(int)).mean() < 6
    values = set(np.unique(label).tolist())
    assert values <= set(range(synthetic_scenes.NUM_CLASSES)) | {255}
    assert 255 in values and len(values - {255}) >= 2
    h, w = label.shape
    assert cfg.min_short <= min(h, w) <= cfg.max_short
  again, _ = synthetic_scenes.generate_example(0, 'train', 1, cfg)
  np.testing.assert_array_equal(again, synthetic_scenes.generate_example(0, 'train', 1, cfg)[0])
  assert not np.array_equal(again, synthetic_scenes.generate_example(1, 'train', 1, cfg)[0])


def test_synthetic_classes_differ_in_colour():
  """Per-class mean colours are separated: the data is learnable from appearance."""
  cfg = synthetic_scenes.SMALL
  sums = np.zeros((synthetic_scenes.NUM_CLASSES, 3))
  counts = np.zeros(synthetic_scenes.NUM_CLASSES)
  for i in range(12):
    image, label = synthetic_scenes.generate_example(0, 'train', i, cfg)
    for c in range(synthetic_scenes.NUM_CLASSES):
      m = label == c
      sums[c] += image[m].sum(0)
      counts[c] += m.sum()
  present = counts > 0
  assert present.sum() >= 6
  means = sums[present] / counts[present, None]
  d = np.linalg.norm(means[:, None] - means[None], axis=-1)
  assert d[np.triu_indices(len(means), 1)].min() > 15


@pytest.mark.parity
def test_label_tables_match_the_reference():
  from tests import reference_utils
  reference_utils._install_torchvision_stand_in()  # pylint: disable=protected-access
  from ssseg.modules.datasets.ade20k import ADE20kDataset
  from ssseg.modules.datasets.cityscapes import CityScapesDataset
  from ssseg.modules.datasets.coco import COCOStuff10kDataset
  from ssseg.modules.datasets.lip import LIPDataset
  from memseg_jax.datasets import ade20k, cityscapes, cocostuff10k, lip
  for ours, ref in ((ade20k, ADE20kDataset), (cityscapes, CityScapesDataset),
                    (cocostuff10k, COCOStuff10kDataset), (lip, LIPDataset)):
    mapping = getattr(ref, 'clsid2label', None) or {c: c for c in range(ref.num_classes)}
    for raw, train_id in mapping.items():
      if raw < 0:
        continue
      assert ours.LUT[raw] == (255 if train_id == -100 else train_id), (ours.NAME, raw)
      assert ours.VALID[raw]
    assert list(ours.CLASS_NAMES) == list(ref.classnames)
    assert [tuple(p) for p in ours.PALETTE] == [tuple(p) for p in ref.palette]
