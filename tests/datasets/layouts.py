"""Writers of tiny downloads in the official folder layouts (a few images each), for tests."""

import os
import zipfile

import cv2
import numpy as np


def _image(rng, h, w):
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_jpg(path, img):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  cv2.imwrite(path, img)


def write_png(path, arr):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  cv2.imwrite(path, arr)


def raw_label(rng, h, w, values):
  """A label whose first pixels enumerate `values` (so every value is present), rest random."""
  values = np.asarray(values, np.uint8)
  lab = rng.choice(values, size=h * w).astype(np.uint8)
  lab[:len(values)] = values
  return lab.reshape(h, w)


def ade20k(root, seed=0, n_train=2, n_val=1, size=(12, 16)):
  """ADEChallengeData2016 layout; returns {split: {file stem: raw label}}."""
  rng = np.random.default_rng(seed)
  out = {'train': {}, 'validation': {}}
  base = os.path.join(root, 'ADEChallengeData2016')
  for split, folder, n in (('train', 'training', n_train), ('validation', 'validation', n_val)):
    for i in range(n):
      stem = f'ADE_{folder}_{i:08d}'
      h, w = size[0] + i, size[1] + 2 * i
      lab = raw_label(rng, h, w, range(151))
      write_jpg(os.path.join(base, 'images', folder, stem + '.jpg'), _image(rng, h, w))
      write_png(os.path.join(base, 'annotations', folder, stem + '.png'), lab)
      out[split][stem] = lab
  return out


def cityscapes(root, seed=0):
  rng = np.random.default_rng(seed)
  out = {'train': {}, 'validation': {}}
  for split, folder, cities in (('train', 'train', ('aachen', 'bochum')),
                                ('validation', 'val', ('frankfurt',))):
    for k, city in enumerate(cities):
      stem = f'{city}_000000_{k:06d}'
      lab = raw_label(rng, 12, 24, range(34))
      write_png(os.path.join(root, 'leftImg8bit', folder, city, stem + '_leftImg8bit.png'),
                _image(rng, 12, 24))
      write_png(os.path.join(root, 'gtFine', folder, city, stem + '_gtFine_labelIds.png'), lab)
      # Other gtFine files of the official download must be ignored.
      write_png(os.path.join(root, 'gtFine', folder, city, stem + '_gtFine_instanceIds.png'),
                lab)
      out[split][stem] = lab
  return out


def lip(root, seed=0):
  rng = np.random.default_rng(seed)
  out = {'train': {}, 'validation': {}}
  for split, folder in (('train', 'train'), ('validation', 'val')):
    for i in range(2):
      stem = f'{100 + i}_{i}'
      lab = raw_label(rng, 14, 10, range(20))
      write_jpg(os.path.join(root, 'TrainVal_images', f'{folder}_images', stem + '.jpg'),
                _image(rng, 14, 10))
      write_png(os.path.join(root, 'TrainVal_parsing_annotations',
                             f'{folder}_segmentations', stem + '.png'), lab)
      out[split][stem] = lab
  return out


def cocostuff10k(root, seed=0):
  import scipy.io
  rng = np.random.default_rng(seed)
  out = {'train': {}, 'test': {}}
  names = {'train': ['COCO_train2014_000000000077', 'COCO_train2014_000000000078'],
           'test': ['COCO_train2014_000000000079']}
  os.makedirs(os.path.join(root, 'imageLists'), exist_ok=True)
  os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
  for split, ids in names.items():
    with open(os.path.join(root, 'imageLists', f'{split}.txt'), 'w') as f:
      f.write('\n'.join(ids) + '\n')
    for name in ids:
      lab = raw_label(rng, 14, 16, list(range(183)) + [255])
      write_jpg(os.path.join(root, 'images', name + '.jpg'), _image(rng, 14, 16))
      scipy.io.savemat(os.path.join(root, 'annotations', name + '.mat'), {'S': lab})
      out[split][name] = lab
  return out


def zip_folder(folder, zip_path):
  """Zips `folder` (paths inside relative to its parent), like the official archives."""
  parent = os.path.dirname(folder.rstrip('/'))
  with zipfile.ZipFile(zip_path, 'w') as zf:
    for dirpath, _, files in os.walk(folder):
      for f in files:
        full = os.path.join(dirpath, f)
        zf.write(full, os.path.relpath(full, parent))
